"""The discrete vocabulary: text ids, then special tokens, and the shape-token grammar.

Layout of ids (T = num_text_tokens, M = number of modalities):

    [0, T)            text
    T .. T + 9        shape digits 0-9
    T + 10            axis separator  ','
    T + 11            shape end       ':'  (the latent tokens follow)
    T + 12            begin of sample (BOS)
    T + 13            end of sample (EOS)
    T + 14 + 2m       begin of a modality-m instance
    T + 15 + 2m       end of a modality-m instance

A modality instance of shape (14, 14) is written `begin 1 4 , 1 4 : <196 latents> end`; a
zero-axis instance (one latent vector) is `begin : <1 latent> end`; with shape tokens off it is
`begin <latents> end`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NUM_DIGITS = 10
MAX_AXES = 8  # grammar bound when a modality's number of axes is not fixed by its default shape


class Vocabulary:
    """Ids of every discrete token for a model with `num_text_tokens` text ids and
    `num_modalities` modalities."""

    def __init__(self, num_text_tokens: int, num_modalities: int):
        self.num_text_tokens = num_text_tokens
        self.num_modalities = num_modalities
        first_digit = num_text_tokens
        self.digits = tuple(range(first_digit, first_digit + NUM_DIGITS))
        self.axis_separator = first_digit + NUM_DIGITS
        self.shape_end = self.axis_separator + 1
        self.bos = self.shape_end + 1
        self.eos = self.bos + 1
        self.begin = tuple(self.eos + 1 + 2 * m for m in range(num_modalities))
        self.end = tuple(self.eos + 2 + 2 * m for m in range(num_modalities))
        self.size = self.eos + 1 + 2 * num_modalities

    def modality_of_begin(self, token: int) -> int | None:
        """The modality index if `token` is a begin token, else None."""
        offset = token - self.eos - 1
        return offset // 2 if 0 <= offset < 2 * self.num_modalities and offset % 2 == 0 else None

    def shape_ids(self, shape: tuple[int, ...]) -> list[int]:
        """Shape tokens for `shape`, ending with the shape-end token."""
        ids = []
        for axis_index, axis in enumerate(shape):
            if axis_index > 0:
                ids.append(self.axis_separator)
            ids.extend(self.digits[int(char)] for char in str(axis))
        return ids + [self.shape_end]


@dataclass
class ShapeDecoder:
    """Grammar state while a shape is being decoded after a begin token.

    `allowed(budget)` lists the tokens that keep the shape parseable and the whole instance
    (remaining shape tokens + latent tokens + end token) within `budget` tokens; `push` advances.
    Greedy or sampled decoding restricted to `allowed` therefore always yields a shape.
    """
    vocab: Vocabulary
    num_axes: int | None
    max_value: int
    axes: list[int] = field(default_factory = list)
    digits: str = ''
    done: bool = False

    @property
    def _max_axes(self) -> int:
        return MAX_AXES if self.num_axes is None else self.num_axes

    def _min_length_after(self, axes: list[int], digits: str, ended: bool) -> int:
        """Fewest tokens still needed to finish the instance from this state: the rest of the shape
        (every unwritten axis taken as 1), the latent tokens and the end token."""
        if ended:
            return math.prod(axes) + 1
        current = [int(digits)] if digits else []
        written = len(axes) + len(current)
        if self.num_axes is not None:
            required = self.num_axes
        else:
            required = written + (1 if axes and not digits else 0)  # after a separator one more axis is due
        missing = required - written
        if digits:
            shape_tokens = 2 * missing + 1          # (separator, digit) per missing axis, then ':'
        else:
            shape_tokens = 2 * missing if missing else 1
        return shape_tokens + math.prod(axes + current) + 1

    def allowed(self, budget: int) -> list[int]:
        vocab = self.vocab
        options = []
        for digit, token in enumerate(vocab.digits):
            if digit == 0 and not self.digits:
                continue  # no leading zeros, no empty axes
            candidate = self.digits + str(digit)
            starting_axis = not self.digits
            if starting_axis and len(self.axes) >= self._max_axes:
                continue
            if int(candidate) > self.max_value:
                continue
            if self._min_length_after(self.axes, candidate, False) < budget:
                options.append(token)
        axes_if_closed = self.axes + ([int(self.digits)] if self.digits else [])
        if self.digits and len(axes_if_closed) < self._max_axes:
            if self._min_length_after(axes_if_closed, '', False) < budget:
                options.append(vocab.axis_separator)
        can_end = (self.digits or not self.axes) and (self.num_axes is None or len(axes_if_closed) == self.num_axes)
        if can_end and self._min_length_after(axes_if_closed, '', True) < budget:
            options.append(vocab.shape_end)
        return options

    def push(self, token: int) -> None:
        vocab = self.vocab
        if token == vocab.shape_end:
            if self.digits:
                self.axes.append(int(self.digits))
            self.digits, self.done = '', True
        elif token == vocab.axis_separator:
            self.axes.append(int(self.digits))
            self.digits = ''
        else:
            self.digits += str(vocab.digits.index(token))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.axes)


def min_instance_length(num_axes: int | None, shape_tokens: bool, fixed_shape: tuple[int, ...] | None) -> int:
    """Fewest tokens a modality instance can take, begin and end tokens included."""
    if fixed_shape is not None:
        shape_len = len(Vocabulary(0, 0).shape_ids(fixed_shape)) if shape_tokens else 0
        return 2 + shape_len + math.prod(fixed_shape)
    axes = num_axes if num_axes is not None else 0
    shape_len = max(2 * axes, 1)
    return 2 + shape_len + 1
