"""How a tensor is quantised: bits, symmetry and granularity, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from slimformer.errors import QuantConfigError

WeightGranularity = Literal["tensor", "channel", "group"]
ActGranularity = Literal["tensor", "token"]


class _IntegerGrid:
    """The integer range of a ``bits``-wide grid: signed when symmetric, else unsigned."""

    bits: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WeightSpec(_IntegerGrid):
    """Weight quantisation: ``bits`` in 2..8; scales per tensor, per output channel
    (row of an ``[out, in]`` weight), or per group of ``group_size`` input columns."""

    bits: int = 8
    symmetric: bool = True
    granularity: WeightGranularity = "channel"
    group_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise QuantConfigError(
                f"granularity must be tensor, channel or group, got {self.granularity!r}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise QuantConfigError(
                    f"group granularity needs a positive group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise QuantConfigError("group_size is only valid with granularity: group")

    def describe(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"w{self.bits}-{gran}-{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class ActSpec(_IntegerGrid):
    """Activation quantisation of a Linear's input: per tensor or per token; dynamic
    (scale from each input) or static (scale fixed from calibration)."""

    bits: int = 8
    symmetric: bool = True
    granularity: ActGranularity = "token"
    dynamic: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantConfigError(f"activation bits must be from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "token"):
            raise QuantConfigError(
                f"activation granularity must be tensor or token, got {self.granularity!r}"
            )
        if not self.dynamic and self.granularity == "token":
            raise QuantConfigError("static activation scales are per tensor; use granularity: tensor")


@dataclass(frozen=True)
class QuantFormat:
    """The format arguments of a quantising Transform (RTN, GPTQ): the recipe keys for
    weights and, optionally, the layer inputs (``act_bits: null`` = weight-only)."""

    bits: int = 8
    symmetric: bool = True
    granularity: WeightGranularity = "channel"
    group_size: int | None = None
    act_bits: int | None = None
    act_granularity: ActGranularity = "token"
    act_dynamic: bool = True
    act_symmetric: bool = True

    def __post_init__(self):
        self.weight_spec()   # validate early: bits range, group settings
        self.act_spec()

    def weight_spec(self, bits: int | None = None) -> WeightSpec:
        """The weight format, at ``bits`` when a plan (HAWQ) chose them for a layer."""
        return WeightSpec(bits or self.bits, self.symmetric, self.granularity, self.group_size)

    def act_spec(self) -> ActSpec | None:
        if self.act_bits is None:
            return None
        return ActSpec(self.act_bits, self.act_symmetric, self.act_granularity, self.act_dynamic)
