from inpo_pipeline.cli.app import main

main()
