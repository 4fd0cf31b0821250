from batchwise.cli.main import main

main()
