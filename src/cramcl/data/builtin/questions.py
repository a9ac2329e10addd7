"""The stream's instruction formats: one question template per format, shared by every task of the format.

Tasks of one format ask the SAME question over different visual domains (or answer spaces), so the
instruction text alone cannot tell them apart: CRAM's level 1 puts them in one group and its level 2
(visual centroids) has to route inside it. The templates were checked with all-MiniLM-L6-v2 and the
default profile's theta (0.25): the five formats land in five groups in the stream's order.
"""
from __future__ import annotations

NAME = "Answer with one word: what do you see?"
NUMBER = "What number does the picture show?"
CORNER = "In which corner of the picture is the object?"
CAPTION = "Describe the scene briefly."
#: The multiple-choice letter format: its stem before the options and its tail after them. The long stem keeps
#: MiniLM from pulling a task whose options are corner words into the corner format's group (docs/profiles.md,
#: "default: cram theta").
CHOICE = "Multiple-choice question: which option matches the picture?"
CHOICE_TAIL = "Reply with the letter of the correct option."

#: The answers of the ``corner`` format: hyphenated words, which must round-trip through the tokenizer.
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
