from batchwise.cli import main

main()
