from models.serving.server import main

main()
