from massrl.cli import run

run()
