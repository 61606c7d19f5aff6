"""The name users know: `utils.helpers.seed_everything(42)` (the seeds live in utils.device)."""
from utils.device import seed_everything  # noqa: F401
