from onnxserve.cli.main import main

main()
