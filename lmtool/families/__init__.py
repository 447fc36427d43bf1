"""Built-in families. Adding a family: write its folder, then add one registration line here."""

from ..registry import register
from .bloom import FAMILY as BLOOM
from .gemma import FAMILY as GEMMA
from .recurrent_gemma import FAMILY as RECURRENT_GEMMA
from .zamba2 import FAMILY as ZAMBA2

register(GEMMA)
register(BLOOM)
register(RECURRENT_GEMMA)
register(ZAMBA2)
