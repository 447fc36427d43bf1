"""Task runners behind `lmtool classify`, `lmtool tag` and `lmtool qa`.

inputs   where items come from (arguments, stdin, file lists, JSON Lines) and how a bad one fails
batching length-sorted padded batches and the block-by-block driver that keeps input order
records  JSON Lines output and --resume
classify sequence-classification scores and labels
tag      token labels, word aggregation, B-/I- grouping and long-input windows
qa       extractive answer spans over document-stride windows
"""

from .batching import RunSummary, run_task
from .classify import Classify
from .inputs import Item, ItemError
from .qa import Answerer
from .tag import Tagger

__all__ = ["Answerer", "Classify", "Item", "ItemError", "RunSummary", "Tagger", "run_task"]
