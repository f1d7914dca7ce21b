"""weakstil: stromal TIL% scoring from slide-level labels."""

__version__ = "0.1.0"
