from inpo_pipeline.cli import main

main()
