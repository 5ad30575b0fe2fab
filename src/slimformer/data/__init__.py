from slimformer.data.sources import TextSource, load_text
from slimformer.data.tokens import calibration_samples, eval_windows, tokenize

__all__ = ["TextSource", "calibration_samples", "eval_windows", "load_text", "tokenize"]
