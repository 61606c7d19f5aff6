"""`python -m utils.report OUTPUT_DIR`: the live report.html of a run in progress."""
from utils.report.build import main

raise SystemExit(main())
