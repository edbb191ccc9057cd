"""The `plait` command."""
def main() -> None:
    print("hi")
