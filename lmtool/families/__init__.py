"""Built-in families. Adding a family: write its folder, then add one registration line here."""

from ..registry import register
from .bloom import FAMILY as BLOOM
from .gemma import FAMILY as GEMMA

register(GEMMA)
register(BLOOM)
