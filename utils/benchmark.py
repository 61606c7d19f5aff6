"""`python -m utils.benchmark`: the command users know for utils.study.benchmark (its home)."""
from utils.study.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
