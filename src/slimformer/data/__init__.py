from slimformer.data.sources import TextSource, held_out_sentences, load_text
from slimformer.data.tokens import (
           calibration_samples,
           calibration_set,
           eval_windows,
           tokenize,
)

__all__ = ["TextSource", "calibration_samples", "calibration_set", "eval_windows", "held_out_sentences",
           "load_text", "tokenize"]
