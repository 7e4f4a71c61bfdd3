"""The thesis's best hyper-parameters and search grids, as data.

A *suite* is one experiment of the thesis: a set of labelled rows (a label = a factory key
plus fixed options, e.g. ``kbfgs-t20`` = ``kbfgs`` with ``update_freq=20``), each with its
best values per problem (``--hp best`` reproduces that table row) and its grid (``--hp grid``).

=============  =====================================================================================
suite          rows
=============  =====================================================================================
``ch3``        Autoencoders: Table 3.5 (K-BFGS family, KFAC, Adam, SGD-m), Table 4.3 (TNT, Shampoo),
               Table 4.5 (TNT-EF, KFAC-EF). CNNs: Tables 3.7 / 4.4 / 4.6, ResNet32-4: Table 3.10.
               Chapters 3-4 conventions: ``m <- mu m + g`` (``momentum_style="accumulate"``), no L2 term.
``ch2``        Table 2.5 (Fig. 2.2): K-BFGS(-20), K-BFGS(L)(-20), KFAC (pi = 1), Adam / RMSprop
               (beta2 = 0.9), SGD-m; ``momentum_style="average"``, L2 term 1e-5, batch 1000.
``ch2-b100``   Table 2.6 (Figs 2.4-2.6): the same with batch 100.
``landscape``  Fig. 2.3: K-BFGS(-20) and K-BFGS(L)(-20) over alpha x lambda (9 x 5), ch. 2 conventions.
``ablation``   Table 3.8: K-BFGS with improvement #1 (D_P D_LM) and/or #2 (minibatched Hessian action)
               switched off.
``ch4-tuned``  Table 4.7 (Fig. 4.6, MNIST and FACES): lr, damping, mu and beta tuned jointly.
``ch5``        Section 5.8 (Figs 5.1-5.3): SMW-GN, SMW-NG, SMW-NG-BD, HF, KFAC, SGD on the classifiers.
=============  =====================================================================================

Values the thesis does not give are marked ``[inferred]`` in the row's ``source``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..optim.registry import METHODS

#: every factory key (a label that is not a thesis row runs the method with its library defaults)
METHOD_KEYS = tuple(METHODS)

AUTOENCODERS = ("mnist", "faces", "curves")
CNNS = ("cifar10-vgg16", "cifar10-resnet32", "cifar100-vgg16", "cifar100-resnet32")
WIDE = ("cifar10-resnet32-4", "cifar100-resnet32-4")
CLASSIFIERS = ("mnist-mlp", "cifar10-mlp", "webspam")
LANGUAGE_MODELS = ("charlm",)

#: the Table 3.8 switches of ``kbfgs`` (``secondorder.optim.kbfgs.VARIANTS``): the options that turn an
#: improvement off. #1 = D_P D_LM damping of the (s, y) pairs (off: DD, Algorithm 3, so damping <= 1);
#: #2 = minibatched Hessian-action BFGS for H_A (off: the chapter-2 moving average of A).
ABLATION_SWITCHES: dict[str, dict[str, Any]] = {
    "improvement1_off": {"pair_damping": "dd"},
    "improvement2_off": {"a_statistic": "moving-average"},
}

FIRST_ORDER = frozenset({"sgd", "adam", "rmsprop"})


@dataclass(frozen=True)
class Preset:
    """One row of a thesis table for one problem.

    Attributes:
        label: the row's name in our outputs (unique in its suite).
        method: the factory key of ``so.make_optimizer``.
        hp: every hyper-parameter passed to the optimizer (the best values plus fixed options).
        grid: ``name -> values`` searched by ``--hp grid`` (the other entries of ``hp`` stay fixed).
        source: the thesis table or section the values come from.
        thesis_name: the row's name in the thesis.
        default: part of the suite's default comparison.
    """

    label: str
    method: str
    hp: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    source: str = ""
    thesis_name: str = ""
    default: bool = True

    def grid_points(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid, each merged into ``hp`` (``[hp]`` without a grid)."""
        if not self.grid:
            return [dict(self.hp)]
        names = list(self.grid)
        return [
            {**self.hp, **dict(zip(names, values, strict=True))}
            for values in itertools.product(*(self.grid[n] for n in names))
        ]


@dataclass(frozen=True)
class Suite:
    """A thesis experiment: its rows per problem, and what it changes in the problem."""

    name: str
    description: str
    rows: dict[str, list[Preset]]  # problem -> rows
    batch_size: int | None = None  # overrides the problem's
    l2: float = 0.0  # chapter 2's (eta / 2) |theta|^2 term


# ------------------------------------------------------------------------------------ grids
LR_CH2 = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
DAMP_CH2 = [3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
EPS_CH2 = [1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1]
LR_LANDSCAPE = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
DAMP_LANDSCAPE = [1e-2, 3e-2, 0.1, 0.3, 1.0]
LR_CH3 = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0]
DAMP_CH3 = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
EPS_CH3 = [1e-8, 1e-4, 1e-3, 0.01, 0.1]
GRID_CH4_AE = {  # 4.7.2, autoencoders
    "sgd": {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03]},
    "adam": {"lr": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01], "damping": [1e-8, 1e-4, 1e-2]},
    "shampoo": {"lr": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "damping": [1e-4, 3e-4, 1e-3, 3e-3, 0.01]},
    "tnt": {
        "lr": [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
        "damping": [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3],
    },
    "kfac": {
        "lr": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3],
        "damping": [0.01, 0.03, 0.1, 0.3, 1, 3, 10],
    },
}
#: Table 4.5's EF values lie outside the 4.7.2 grids, so the EF grids are widened to contain them [inferred]
GRID_EF_AE = {
    "tnt-ef": {
        "lr": [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
        "damping": [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0],
    },
    "kfac-ef": {
        "lr": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0],
        "damping": [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100],
    },
}
MU_BETA = [0.9, 0.99, 0.999]
GRID_CNN = {  # 3.7.2 and 4.7.2, CNNs: (lr, weight_decay, damping)
    "kbfgs": {
        "lr": [0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1e3, 3e3],
        "weight_decay": [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1],
        "damping": [1, 10, 100, 1e3, 1e4, 1e5],
    },
    # lr 3e-4 added: Tables 3.7 / 4.6 select it although 3.7.2 does not list it
    "kfac": {
        "lr": [3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3],
        "weight_decay": [1e-3, 0.01, 0.1, 1],
        "damping": [1e-4, 1e-3, 0.01, 0.1, 1, 10, 100],
    },
    "adam": {
        "lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1],
        "weight_decay": [0.01, 0.1, 1, 10],
        "damping": [1e-8, 1e-4, 0.01, 0.1, 1],
    },
    "sgd": {"lr": [3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3], "weight_decay": [1e-3, 0.01, 0.1, 1]},
    "shampoo": {
        "lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1],
        "weight_decay": [0.01, 0.1, 1, 10],
        "damping": [1e-3, 0.01, 0.1, 1],
    },
    "tnt": {
        "lr": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
        "weight_decay": [1, 10, 100],
        "damping": [1e-3, 0.01, 0.1, 1],
    },
}
GRID_CNN["kbfgsl"] = GRID_CNN["kbfgs"]
GRID_CNN["kfac-ef"] = GRID_CNN["kfac"]
GRID_CNN["tnt-ef"] = GRID_CNN["tnt"]

# ------------------------------------------------------------------------------------ fixed options
#: chapters 3-4, autoencoders (3.7.1, 4.7.1): T = 1 for K-BFGS (T = 20 for K-BFGS-dagger), T1 = 1, T2 = 20
FIXED_AE: dict[str, tuple[str, dict[str, Any], str]] = {  # label -> (method, options, thesis name)
    "kbfgs": ("kbfgs", {"update_freq": 1}, "K-BFGS"),
    "kbfgs-t20": ("kbfgs", {"update_freq": 20}, "K-BFGS† (T=20)"),
    "kbfgsl": ("kbfgsl", {"update_freq": 1, "history_size": 100}, "K-BFGS(L)"),
    "kbfgs20": ("kbfgs20", {"momentum_style": "accumulate"}, "K-BFGS-20"),
    "kbfgsl20": ("kbfgsl20", {"momentum_style": "accumulate", "history_size": 100}, "K-BFGS(L)-20"),
    "kfac": ("kfac", {"update_freq": 1, "inverse_freq": 20}, "KFAC"),
    # the published chapter-3/4 code path that produced Table 3.3 fixes pi = 1 (docs/notes.md §7, §11.7)
    "kfac-pi1": (
        "kfac",
        {"update_freq": 1, "inverse_freq": 20, "pi": "none"},
        "KFAC (pi = 1, published code)",
    ),
    "adam": ("adam", {}, "Adam"),
    "sgd": ("sgd", {}, "SGD-m"),
    "tnt": ("tnt", {"update_freq": 1, "inverse_freq": 20}, "TNT"),
    "shampoo": ("shampoo", {"update_freq": 1, "inverse_freq": 20}, "Shampoo"),
    "tnt-ef": ("tnt-ef", {"update_freq": 1, "inverse_freq": 20}, "TNT-EF"),
    "kfac-ef": ("kfac-ef", {"update_freq": 1, "inverse_freq": 20}, "KFAC-EF"),
}
#: CNNs (3.7.1, 4.7.1): K-BFGS T = 20; KFAC, TNT, Shampoo T1 = 10, T2 = 100
FIXED_CNN: dict[str, tuple[str, dict[str, Any], str]] = {
    "kbfgs": ("kbfgs", {"update_freq": 20}, "K-BFGS"),
    "kbfgsl": ("kbfgsl", {"update_freq": 20, "history_size": 100}, "K-BFGS(L)"),
    "kfac": ("kfac", {"update_freq": 10, "inverse_freq": 100}, "KFAC"),
    "adam": ("adam", {}, "Adam"),
    "sgd": ("sgd", {}, "SGD-m"),
    "tnt": ("tnt", {"update_freq": 10, "inverse_freq": 100}, "TNT"),
    "shampoo": ("shampoo", {"update_freq": 10, "inverse_freq": 100, "inverse_timing": "tnt"}, "Shampoo"),
    "tnt-ef": ("tnt-ef", {"update_freq": 10, "inverse_freq": 100}, "TNT-EF"),
    "kfac-ef": ("kfac-ef", {"update_freq": 10, "inverse_freq": 100}, "KFAC-EF"),
}

# ------------------------------------------------------------------------------------ best values
#: (lr, damping) per autoencoder problem; SGD-m: lr only
TABLE_3_5 = {
    "kbfgs": {"mnist": (0.03, 0.3), "faces": (0.03, 1), "curves": (0.03, 0.3)},
    "kbfgs-t20": {"mnist": (0.3, 30), "faces": (0.03, 3), "curves": (0.3, 30)},
    "kbfgsl": {"mnist": (0.03, 0.3), "faces": (0.03, 1), "curves": (0.1, 3)},
    "kbfgs20": {"mnist": (0.01, 0.1), "faces": (0.01, 0.3), "curves": (0.01, 0.03)},
    "kbfgsl20": {"mnist": (0.003, 0.1), "faces": (0.01, 0.3), "curves": (0.003, 0.03)},
    "kfac": {"mnist": (0.03, 1), "faces": (0.01, 0.1), "curves": (0.3, 30)},
    "adam": {"mnist": (1e-4, 1e-4), "faces": (1e-4, 1e-4), "curves": (1e-3, 1e-3)},
    "sgd": {"mnist": (0.003,), "faces": (0.001,), "curves": (0.003,)},
}
TABLE_4_3 = {
    "tnt": {"mnist": (1e-4, 0.1), "faces": (1e-6, 0.003), "curves": (3e-6, 0.01)},
    "shampoo": {"mnist": (3e-4, 3e-4), "faces": (3e-4, 3e-4), "curves": (3e-4, 3e-4)},
}
TABLE_4_5 = {
    "tnt-ef": {"mnist": (3e-6, 0.01), "faces": (3e-6, 0.01), "curves": (0.003, 1)},
    "kfac-ef": {"mnist": (1, 100), "faces": (0.3, 30), "curves": (1, 100)},
}
#: chapter 2 (lr, damping); K-BFGS rows are the -20 variants
TABLE_2_5 = {
    "kbfgs20": {"mnist": (0.3, 0.3), "faces": (0.1, 0.1), "curves": (0.1, 0.01)},
    "kbfgsl20": {"mnist": (0.3, 0.3), "faces": (0.1, 0.1), "curves": (0.3, 0.3)},
    "kfac": {"mnist": (1, 3), "faces": (0.1, 0.1), "curves": (0.3, 0.3)},
    "adam": {"mnist": (1e-4, 1e-4), "faces": (1e-4, 1e-4), "curves": (1e-3, 1e-3)},
    "rmsprop": {"mnist": (1e-4, 1e-4), "faces": (1e-4, 1e-4), "curves": (1e-3, 1e-3)},
    "sgd": {"mnist": (0.03,), "faces": (0.01,), "curves": (0.1,)},
}
TABLE_2_6 = {
    "kbfgs20": {"mnist": (0.1, 0.3), "faces": (0.03, 0.03), "curves": (0.3, 1)},
    "kbfgsl20": {"mnist": (0.1, 0.3), "faces": (0.03, 0.3), "curves": (0.3, 0.3)},
    "kfac": {"mnist": (0.1, 0.3), "faces": (0.03, 0.3), "curves": (0.03, 0.1)},
    "adam": {"mnist": (1e-4, 1e-4), "faces": (3e-5, 1e-4), "curves": (3e-4, 1e-4)},
    "rmsprop": {"mnist": (1e-4, 1e-4), "faces": (3e-5, 1e-4), "curves": (3e-3, 1e-4)},
    "sgd": {"mnist": (0.03,), "faces": (0.01,), "curves": (0.03,)},
}
#: (lr, damping, mu, beta) on MNIST and FACES; SGD-m: (lr, mu)
TABLE_4_7 = {
    "tnt": {"mnist": (1e-4, 0.1, 0.9, 0.9), "faces": (1e-6, 0.003, 0.9, 0.9)},
    "kfac": {"mnist": (0.001, 0.1, 0.99, 0.99), "faces": (0.01, 0.1, 0.9, 0.9)},
    "shampoo": {"mnist": (1e-4, 3e-4, 0.99, 0.99), "faces": (1e-4, 3e-4, 0.99, 0.999)},
    "adam": {"mnist": (1e-4, 1e-4, 0.99, 0.99), "faces": (1e-4, 1e-4, 0.9, 0.9)},
    "sgd": {"mnist": (0.001, 0.99), "faces": (0.001, 0.9)},
}
#: CNNs (initial lr, weight decay, damping); SGD-m: (lr, weight decay)
TABLE_3_7 = {
    "kbfgs": {
        "cifar10-vgg16": (30, 1e-5, 1e4),
        "cifar10-resnet32": (100, 1e-5, 1e3),
        "cifar100-vgg16": (0.1, 0.01, 10),
        "cifar100-resnet32": (1e3, 1e-6, 1e4),
    },
    "kbfgsl": {
        "cifar10-vgg16": (1, 1e-3, 100),
        "cifar10-resnet32": (1e3, 1e-6, 1e4),
        "cifar100-vgg16": (0.3, 1e-3, 100),
        "cifar100-resnet32": (10, 1e-4, 100),
    },
    "kfac": {
        "cifar10-vgg16": (3e-4, 1, 1e-3),
        "cifar10-resnet32": (0.01, 0.1, 0.1),
        "cifar100-vgg16": (0.01, 0.1, 1),
        "cifar100-resnet32": (0.1, 0.01, 0.1),
    },
    "adam": {
        "cifar10-vgg16": (0.003, 0.1, 0.1),
        "cifar10-resnet32": (0.003, 0.1, 0.01),
        "cifar100-vgg16": (3e-4, 1, 0.01),
        "cifar100-resnet32": (0.01, 0.1, 0.01),
    },
    "sgd": {
        "cifar10-vgg16": (0.003, 0.1),
        "cifar10-resnet32": (0.03, 0.01),
        "cifar100-vgg16": (0.003, 0.1),
        "cifar100-resnet32": (0.03, 0.01),
    },
}
TABLE_4_4 = {
    "tnt": {
        "cifar10-vgg16": (1e-4, 10, 0.1),
        "cifar10-resnet32": (1e-4, 10, 0.01),
        "cifar100-vgg16": (1e-4, 10, 0.1),
        "cifar100-resnet32": (1e-4, 10, 0.01),
    },
    "shampoo": {
        "cifar10-vgg16": (1e-3, 1, 0.1),
        "cifar10-resnet32": (0.01, 0.1, 0.01),
        "cifar100-vgg16": (1e-3, 1, 0.01),
        "cifar100-resnet32": (0.01, 0.1, 0.01),
    },
}
TABLE_4_6 = {
    "tnt-ef": {
        "cifar10-vgg16": (1e-4, 10, 0.1),
        "cifar10-resnet32": (1e-4, 10, 0.01),
        "cifar100-vgg16": (3e-5, 10, 0.1),
        "cifar100-resnet32": (1e-4, 10, 0.01),
    },
    "kfac-ef": {
        "cifar10-vgg16": (3e-4, 1, 1e-3),
        "cifar10-resnet32": (0.01, 0.1, 0.1),
        "cifar100-vgg16": (3e-4, 1, 0.1),
        "cifar100-resnet32": (0.01, 0.1, 1e-3),
    },
}
TABLE_3_10 = {
    "kbfgs": {"cifar10-resnet32-4": (1e3, 1e-6, 1e4), "cifar100-resnet32-4": (100, 1e-5, 1e3)},
    "kbfgsl": {"cifar10-resnet32-4": (1e3, 1e-6, 1e4), "cifar100-resnet32-4": (1e3, 1e-6, 1e4)},
    "kfac": {"cifar10-resnet32-4": (0.1, 0.01, 1), "cifar100-resnet32-4": (0.01, 0.1, 0.01)},
    "adam": {"cifar10-resnet32-4": (0.03, 0.01, 0.1), "cifar100-resnet32-4": (0.003, 0.1, 0.01)},
    "sgd": {"cifar10-resnet32-4": (0.03, 0.01), "cifar100-resnet32-4": (0.01, 0.1)},
}

# ------------------------------------------------------------------------------------ thesis results
#: Table 3.3 (training loss, mean of 5 seeds, real data) by ch3 label
THESIS_TABLE_3_3 = {
    "kbfgs": {"mnist": 51.60, "faces": 5.00, "curves": 55.46},
    "kbfgs-t20": {"mnist": 52.01, "faces": 4.62, "curves": 55.06},
    "kbfgsl": {"mnist": 51.53, "faces": 4.83, "curves": 55.31},
    "kbfgs20": {"mnist": 52.38, "faces": 5.46, "curves": 56.00},
    "kbfgsl20": {"mnist": 54.27, "faces": 4.92, "curves": 55.94},
    "kfac": {"mnist": 51.24, "faces": 4.71, "curves": 55.12},
    "kfac-pi1": {"mnist": 51.24, "faces": 4.71, "curves": 55.12},  # the same runs (docs/notes.md §7)
    "adam": {"mnist": 52.76, "faces": 5.33, "curves": 55.24},
    "sgd": {"mnist": 54.75, "faces": 6.47, "curves": 55.97},
}


@dataclass(frozen=True)
class Ordering:
    """An ordering the thesis states in its text for the autoencoders: row ``better`` ends with a
    lower training loss than row ``worse`` on each of ``problems`` at the same time budget."""

    better: str
    worse: str
    problems: tuple[str, ...]
    source: str


_AE3 = ("mnist", "faces", "curves")
#: the orderings the thesis claims for the ch3 suite's autoencoder rows (Sec. 3.5 on Table 3.3;
#: Sec. 4.6 on Fig. 4.2); pairs it calls "similar" (K-BFGS and KFAC, TNT and KFAC on FACES) are
#: not orderings and are left out
THESIS_ORDERINGS = (
    Ordering("kbfgs", "kbfgs20", _AE3, "Table 3.3: K-BFGS beats its chapter-2 counterpart"),
    Ordering("kbfgsl", "kbfgsl20", _AE3, "Table 3.3: K-BFGS(L) beats its chapter-2 counterpart"),
    Ordering("kbfgs", "sgd", _AE3, "Table 3.3: K-BFGS beats the first-order methods"),
    Ordering("kbfgsl", "sgd", _AE3, "Table 3.3: K-BFGS(L) beats the first-order methods"),
    Ordering("kbfgs", "adam", ("mnist", "faces"), "Table 3.3: ... except Adam on CURVES"),
    Ordering("kbfgsl", "adam", ("mnist", "faces"), "Table 3.3: ... except Adam on CURVES"),
    Ordering("tnt", "sgd", _AE3, "Fig. 4.2: TNT beats SGD-m, Adam and Shampoo"),
    Ordering("tnt", "adam", _AE3, "Fig. 4.2: TNT beats SGD-m, Adam and Shampoo"),
    Ordering("tnt", "shampoo", _AE3, "Fig. 4.2: TNT beats SGD-m, Adam and Shampoo"),
    Ordering("kfac", "tnt", ("mnist",), "Fig. 4.2: TNT falls behind KFAC on MNIST"),
    Ordering("tnt", "kfac", ("curves",), "Fig. 4.2: TNT beats KFAC on CURVES"),
)
#: Table 3.8 (training loss, ablation) by ablation label
THESIS_TABLE_3_8 = {
    "kbfgs": {"mnist": 51.60, "faces": 5.00, "curves": 55.46},
    "kbfgs-no-dpdlm": {"mnist": 51.92, "faces": 5.39, "curves": 55.86},
    "kbfgs-no-minibatch-ha": {"mnist": 51.45, "faces": 5.26, "curves": 55.88},
    "kbfgs20": {"mnist": 52.38, "faces": 5.46, "curves": 56.00},
}
#: validation accuracy (%) of Tables 3.4, 4.2, 4.6 and 3.9
THESIS_ACCURACY = {
    "kbfgs": {
        "cifar10-vgg16": 94.28,
        "cifar10-resnet32": 93.45,
        "cifar100-vgg16": 75.65,
        "cifar100-resnet32": 71.46,
        "cifar10-resnet32-4": 95.61,
        "cifar100-resnet32-4": 79.41,
    },
    "kbfgsl": {
        "cifar10-vgg16": 94.24,
        "cifar10-resnet32": 93.38,
        "cifar100-vgg16": 75.43,
        "cifar100-resnet32": 70.98,
        "cifar10-resnet32-4": 95.74,
        "cifar100-resnet32-4": 79.18,
    },
    "kfac": {
        "cifar10-vgg16": 94.39,
        "cifar10-resnet32": 93.31,
        "cifar100-vgg16": 76.21,
        "cifar100-resnet32": 71.14,
        "cifar10-resnet32-4": 95.65,
        "cifar100-resnet32-4": 79.45,
    },
    "adam": {
        "cifar10-vgg16": 94.28,
        "cifar10-resnet32": 93.35,
        "cifar100-vgg16": 75.64,
        "cifar100-resnet32": 70.35,
        "cifar10-resnet32-4": 95.64,
        "cifar100-resnet32-4": 78.03,
    },
    "sgd": {
        "cifar10-vgg16": 94.14,
        "cifar10-resnet32": 93.13,
        "cifar100-vgg16": 75.41,
        "cifar100-resnet32": 70.18,
        "cifar10-resnet32-4": 95.59,
        "cifar100-resnet32-4": 78.24,
    },
    "tnt": {
        "cifar10-vgg16": 94.31,
        "cifar10-resnet32": 93.48,
        "cifar100-vgg16": 76.01,
        "cifar100-resnet32": 71.70,
    },
    "shampoo": {
        "cifar10-vgg16": 93.88,
        "cifar10-resnet32": 93.13,
        "cifar100-vgg16": 76.02,
        "cifar100-resnet32": 70.35,
    },
    "tnt-ef": {
        "cifar10-vgg16": 94.50,
        "cifar10-resnet32": 93.24,
        "cifar100-vgg16": 75.27,
        "cifar100-resnet32": 71.58,
    },
    "kfac-ef": {
        "cifar10-vgg16": 94.29,
        "cifar10-resnet32": 93.16,
        "cifar100-vgg16": 75.55,
        "cifar100-resnet32": 71.61,
    },
}


# ------------------------------------------------------------------------------------ building rows
def _dd_grid(grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Double damping (Algorithm 3) needs mu2 = sqrt(damping) <= 1 (docs/notes.md §11.3): drop larger
    damping values from the grid of a DD row (the thesis's best DD values are all <= 1) [inferred]."""
    return {k: [v for v in vals if v <= 1] if k == "damping" else vals for k, vals in grid.items()}


def _ae_row(
    label: str,
    problem: str,
    table: dict,
    source: str,
    *,
    default: bool = True,
    grid: dict[str, list[Any]] | None = None,
) -> Preset:
    method, fixed, thesis_name = FIXED_AE[label]
    values = table[label][problem]
    hp: dict[str, Any] = {**fixed, "lr": values[0]}
    if len(values) > 1:
        hp["damping"] = values[1]
    if grid is None:
        grid = (
            {"lr": LR_CH3}
            if method == "sgd"
            else {"lr": LR_CH3, "damping": EPS_CH3 if method == "adam" else DAMP_CH3}
        )
    if method in ("kbfgs20", "kbfgsl20"):
        grid = _dd_grid(grid)
    return Preset(label, method, hp, grid, source, thesis_name, default)


def _ch3_autoencoder(problem: str) -> list[Preset]:
    rows = [_ae_row(label, problem, TABLE_3_5, "Table 3.5") for label in TABLE_3_5]
    # Table 3.5's KFAC values with the pi = 1 of the code that produced them (not a default row)
    pi1 = {"kfac-pi1": TABLE_3_5["kfac"]}
    rows.append(_ae_row("kfac-pi1", problem, pi1, "Table 3.5 (pi = 1)", default=False))
    rows += [_ae_row(label, problem, TABLE_4_3, "Table 4.3", grid=GRID_CH4_AE[label]) for label in TABLE_4_3]
    rows += [
        _ae_row(
            label,
            problem,
            TABLE_4_5,
            "Table 4.5 (grid widened to contain it [inferred])",
            default=False,
            grid=GRID_EF_AE[label],
        )
        for label in TABLE_4_5
    ]
    return rows


def _ch2_autoencoder(problem: str, table: dict, source: str) -> list[Preset]:
    names = {
        "kbfgs20": "K-BFGS (Alg. 4)",
        "kbfgsl20": "K-BFGS(L) (Alg. 4)",
        "kfac": "KFAC (Alg. 7)",
        "adam": "Adam",
        "rmsprop": "RMSprop",
        "sgd": "SGD-m",
    }
    rows = []
    for label, per_problem in table.items():
        values = per_problem[problem]
        hp: dict[str, Any] = {"lr": values[0]}
        if label in ("adam", "rmsprop"):
            hp.update(damping=values[1], stat_decay=0.9)  # beta2 = 0.9 (footnote 5)
            grid = {"lr": LR_CH2, "damping": EPS_CH2}
        elif label == "sgd":
            hp["momentum_style"] = "average"
            grid = {"lr": LR_CH2}
        else:
            hp.update(damping=values[1], momentum_style="average")
            if label == "kfac":
                hp.update(pi="none", update_freq=1, inverse_freq=20)  # Algorithm 7: pi = 1, T = 20
            if label == "kbfgsl20":
                hp["history_size"] = 100
            grid = {"lr": LR_CH2, "damping": DAMP_CH2}
            if label != "kfac":
                grid = _dd_grid(grid)
        rows.append(Preset(label, label, hp, grid, source, names[label]))
    return rows


def _landscape(problem: str) -> list[Preset]:
    rows = []
    for row in _ch2_autoencoder(problem, TABLE_2_5, "Table 2.5 / Fig. 2.3"):
        if row.method in ("kbfgs20", "kbfgsl20"):
            rows.append(
                Preset(
                    row.label,
                    row.method,
                    row.hp,
                    {"lr": LR_LANDSCAPE, "damping": DAMP_LANDSCAPE},
                    "Fig. 2.3 grid, Table 2.5 best",
                    row.thesis_name,
                )
            )
    return rows


def _ablation(problem: str) -> list[Preset]:
    base = _ae_row("kbfgs", problem, TABLE_3_5, "Table 3.5")
    both_off = _ae_row("kbfgs20", problem, TABLE_3_5, "Table 3.5")
    inferred = "Table 3.8 (best values not listed: Table 3.5's K-BFGS row [inferred])"
    return [
        Preset("kbfgs", "kbfgs", base.hp, base.grid, "Table 3.5", "K-BFGS (#1 on, #2 on)"),
        Preset(
            "kbfgs-no-dpdlm",
            "kbfgs",
            {**base.hp, **ABLATION_SWITCHES["improvement1_off"]},
            _dd_grid(base.grid),
            inferred,
            "K-BFGS (#1 off)",
        ),
        Preset(
            "kbfgs-no-minibatch-ha",
            "kbfgs",
            {**base.hp, **ABLATION_SWITCHES["improvement2_off"]},
            base.grid,
            inferred,
            "K-BFGS (#2 off)",
        ),
        Preset(
            "kbfgs20", both_off.method, both_off.hp, both_off.grid, "Table 3.5", "K-BFGS-20 (#1 off, #2 off)"
        ),
    ]


def _ch4_tuned(problem: str) -> list[Preset]:
    rows = []
    for label, per_problem in TABLE_4_7.items():
        method, fixed, thesis_name = FIXED_AE[label]
        v = per_problem[problem]
        base = GRID_CH4_AE[label]
        if label == "sgd":
            hp = {**fixed, "lr": v[0], "momentum": v[1]}
            grid = {**base, "momentum": MU_BETA}
        else:
            hp = {**fixed, "lr": v[0], "damping": v[1], "momentum": v[2], "stat_decay": v[3]}
            grid = {**base, "momentum": MU_BETA, "stat_decay": MU_BETA}
        rows.append(Preset(label, method, hp, grid, "Table 4.7", thesis_name))
    return rows


def _cnn_row(label: str, problem: str, table: dict, source: str, default: bool = True) -> Preset:
    method, fixed, thesis_name = FIXED_CNN[label]
    v = table[label][problem]
    hp: dict[str, Any] = {**fixed, "lr": v[0], "weight_decay": v[1]}
    if len(v) > 2:
        hp["damping"] = v[2]
    return Preset(label, method, hp, GRID_CNN[label], source, thesis_name, default)


#: grid of the chapter-2 K-BFGS keys on the CNNs [inferred]: DD needs damping <= 1
GRID_CNN_CH2 = {
    "lr": [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3],
    "weight_decay": [1e-4, 1e-3, 0.01, 0.1],
    "damping": [0.01, 0.03, 0.1, 0.3, 1.0],
}


def _ch2_cnn_rows(problem: str) -> list[Preset]:
    """K-BFGS-20 / K-BFGS(L)-20 on a CNN: not in the thesis (chapter 2 has no CNNs).

    [inferred] values: damping 0.3 (the chapter-2 default, DD needs <= 1), T = 20 (the CNN
    convention), and, from the ``kbfgs`` row of Table 3.7, the same learning rate for the
    BatchNorm parameters (chapter 2 uses ``lr`` where chapter 3 uses ``lr/lam``) and the same
    per-step decoupled weight decay ``lr * weight_decay``. Not in the default comparison.
    """
    lr, wd, lam = TABLE_3_7["kbfgs"][problem]
    hp = {"update_freq": 20, "momentum_style": "accumulate", "lr": lr / lam, "weight_decay": wd * lam}
    source = "[inferred] not in the thesis: Table 3.7 kbfgs's lr/lam and lr*wd, damping 0.3, T = 20"
    return [
        Preset("kbfgs20", "kbfgs20", {**hp, "damping": 0.3}, GRID_CNN_CH2, source, "K-BFGS-20", False),
        Preset(
            "kbfgsl20",
            "kbfgsl20",
            {**hp, "damping": 0.3, "history_size": 100},
            GRID_CNN_CH2,
            source,
            "K-BFGS(L)-20",
            False,
        ),
    ]


def _ch3_cnn(problem: str) -> list[Preset]:
    if problem in WIDE:
        return [_cnn_row(label, problem, TABLE_3_10, "Table 3.10") for label in TABLE_3_10]
    rows = [_cnn_row(label, problem, TABLE_3_7, "Table 3.7") for label in TABLE_3_7]
    rows += _ch2_cnn_rows(problem)
    rows += [_cnn_row(label, problem, TABLE_4_4, "Table 4.4") for label in TABLE_4_4]
    rows += [_cnn_row(label, problem, TABLE_4_6, "Table 4.6", default=False) for label in TABLE_4_6]
    return rows


#: section 5.8: (N1 = batch, N2 = curvature_batch, lr per method)
CH5_SETTINGS = {
    "mnist-mlp": (
        60,
        30,
        {"sgd": 0.1, "kfac": 0.1, "hf": 0.1, "smw-gn": 0.1, "smw-ng": 0.1, "smw-ng-bd": 0.1},
    ),
    "cifar10-mlp": (100, 50, {m: 0.01 for m in ("sgd", "kfac", "hf", "smw-gn", "smw-ng", "smw-ng-bd")}),
    "webspam": (
        60,
        30,
        {"sgd": 0.4, "hf": 0.05, "smw-gn": 0.05, "smw-ng": 0.1, "smw-ng-bd": 0.1, "kfac": 0.1},
    ),
}


def _ch5(problem: str) -> list[Preset]:
    _, n2, lrs = CH5_SETTINGS[problem]
    rows = []
    names = {
        "smw-gn": "SMW-GN",
        "smw-ng": "SMW-NG",
        "smw-ng-bd": "SMW-NG-BD",
        "hf": "HF",
        "kfac": "KFAC",
        "sgd": "SGD",
    }
    for method in ("smw-gn", "smw-ng", "smw-ng-bd", "hf", "kfac", "sgd"):
        hp: dict[str, Any] = {"lr": lrs[method]}
        grid: dict[str, list[Any]] = {}
        source = "5.8"
        if method in ("smw-gn", "smw-ng", "smw-ng-bd", "hf"):
            hp["curvature_batch"] = n2
        elif method == "kfac":  # block-diagonal, no re-scaling, no momentum (5.8); damping [inferred]
            hp.update(momentum=0.0, damping=1.0)
            source = "5.8 (damping 1 [inferred])"
        else:
            hp["momentum"] = 0.0
            if problem == "mnist-mlp":
                grid = {"lr": [0.01, 0.05, 0.1, 0.5]}
        rows.append(Preset(method, method, hp, grid, source, names[method]))
    return rows


#: charlm (not a thesis problem): per method the values a 30 s process-time sweep on python-docs
#: found best (one thread; ``--hp grid`` searches the listed learning rates); momentum, stat_decay
#: and frequencies are the methods' defaults
LM_ROWS: dict[str, tuple[str, dict[str, Any], list[float]]] = {
    "sgd-m": ("sgd", {"lr": 0.3}, [0.1, 0.3, 1.0]),
    "adamw": ("adam", {"lr": 0.01, "weight_decay": 0.1}, [3e-3, 0.01, 0.03]),
    "kfac": ("kfac", {"lr": 0.3, "damping": 1.0}, [0.1, 0.3, 1.0]),
    "kfac-ef": ("kfac-ef", {"lr": 0.3, "damping": 1.0}, [0.1, 0.3, 1.0]),
    "kbfgs": ("kbfgs", {"lr": 1.0, "damping": 3.0}, [0.3, 1.0, 3.0]),
    "kbfgsl": ("kbfgsl", {"lr": 0.3, "damping": 1.0}, [0.1, 0.3, 1.0]),
    "tnt": ("tnt", {"lr": 1e-3, "damping": 0.1}, [3e-4, 1e-3, 3e-3]),
    "tnt-ef": ("tnt-ef", {"lr": 3e-3, "damping": 0.1}, [1e-3, 3e-3, 0.01]),
    "shampoo": ("shampoo", {"lr": 0.01, "damping": 1e-3}, [3e-3, 0.01, 0.03]),
}


def _lm(problem: str) -> list[Preset]:
    return [
        Preset(label, method, dict(hp), {"lr": grid}, "ours: 30 s sweep on python-docs", label)
        for label, (method, hp, grid) in LM_ROWS.items()
    ]


def _suite_rows(builder, problems) -> dict[str, list[Preset]]:
    return {p: builder(p) for p in problems}


SUITES: dict[str, Suite] = {
    "ch3": Suite(
        "ch3",
        "chapters 3-4: Tables 3.5/4.3/4.5 (autoencoders), 3.7/4.4/4.6 (CNNs), 3.10 (ResNet32-4)",
        {**_suite_rows(_ch3_autoencoder, AUTOENCODERS), **_suite_rows(_ch3_cnn, CNNS + WIDE)},
    ),
    "ch2": Suite(
        "ch2",
        "chapter 2: Table 2.5 (Fig. 2.2), L2 term 1e-5, momentum m = mu m + (1 - mu) g",
        {p: _ch2_autoencoder(p, TABLE_2_5, "Table 2.5") for p in AUTOENCODERS},
        l2=1e-5,
    ),
    "ch2-b100": Suite(
        "ch2-b100",
        "chapter 2 with minibatches of 100: Table 2.6 (Figs 2.4-2.6)",
        {p: _ch2_autoencoder(p, TABLE_2_6, "Table 2.6") for p in AUTOENCODERS},
        batch_size=100,
        l2=1e-5,
    ),
    "landscape": Suite(
        "landscape",
        "Fig. 2.3: loss landscape of K-BFGS(-20) and K-BFGS(L)(-20) over (lr, damping)",
        _suite_rows(_landscape, AUTOENCODERS),
        l2=1e-5,
    ),
    "ablation": Suite(
        "ablation",
        "Table 3.8: K-BFGS with improvements #1 (D_P D_LM) and #2 (minibatched Hessian action) on or off",
        _suite_rows(_ablation, AUTOENCODERS),
    ),
    "ch4-tuned": Suite(
        "ch4-tuned",
        "Table 4.7 (Fig. 4.6): lr, damping, mu, beta tuned jointly",
        _suite_rows(_ch4_tuned, ("mnist", "faces")),
    ),
    "ch5": Suite(
        "ch5",
        "section 5.8 (Figs 5.1-5.3): SMW-GN/NG, HF, KFAC, SGD on the classifiers",
        _suite_rows(_ch5, CLASSIFIERS),
    ),
    "lm": Suite(
        "lm",
        "not from the thesis: the methods that handle token outputs on a character transformer",
        _suite_rows(_lm, LANGUAGE_MODELS),
    ),
}


def default_suite(problem: str) -> str:
    if problem in LANGUAGE_MODELS:
        return "lm"
    return "ch5" if problem in CLASSIFIERS else "ch3"


def rows_for(suite: str, problem: str) -> list[Preset]:
    """The rows of ``suite`` for ``problem`` (``ValueError`` naming the suites that have the problem)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    rows = SUITES[suite].rows.get(problem)
    if rows is None:
        having = [s for s, v in SUITES.items() if problem in v.rows]
        raise ValueError(
            f"suite {suite!r} has no rows for {problem}; suites with {problem}: {', '.join(having)}"
        )
    return rows


def thesis_value(suite: str, problem: str, label: str) -> float | None:
    """The thesis's reported result for a row (training loss or accuracy %), when it gives one."""
    if suite == "ablation":
        return THESIS_TABLE_3_8.get(label, {}).get(problem)
    if suite == "ch3":
        return THESIS_TABLE_3_3.get(label, {}).get(problem) or THESIS_ACCURACY.get(label, {}).get(problem)
    return None
