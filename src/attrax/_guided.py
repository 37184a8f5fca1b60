"""Modified-backward gradients: guided backpropagation and deconvolution (Springenberg et al. 2015).

Both are the gradient of each target's objective with respect to the source embeddings, taken
through a backward in which every elementwise activation of the model (ReLU, GELU, SiLU; those
attrax runs as its own autograd function, see ``_model.fast_activations``) passes a modified
gradient. For an activation ``y = f(x)`` receiving the gradient ``g``:

- guided backpropagation passes ``relu(g * f'(x))``; for a ReLU that is ``g`` where ``x > 0`` and
  ``g > 0``, zero elsewhere, which is what Captum's ``GuidedBackprop`` does on ``nn.ReLU`` modules;
- deconvolution passes ``relu(g)``, ignoring ``x``: Captum's ``Deconvolution``.

Everything else (attention, norms, residuals, the head) keeps its true gradient. The methods run
on the vectorized engine like saliency: one forward, one vectorized backward per chunk of targets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xarray as xr

from . import _validate as check
from ._engine import Problem
from ._gradients import GRADIENT, Rule
from ._model import backward_rule
from ._protocol import Call, Param

#: Which activations get the modified backward: every elementwise one, or ReLUs only (Captum)
ACTIVATIONS = ("all", "relu")


def _with_rule(rule: str) -> Callable[[Callable[..., Rule], Call, dict[str, Any]], xr.DataArray]:
    def run(core: Callable[..., Rule], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
        kinds = None if arguments["activations"] == "all" else ("relu",)
        # forwards run inside fix the rule; the backwards that follow keep it
        with backward_rule(rule, kinds):
            return GRADIENT.run(core, call, arguments)

    return run


_ACTIVATIONS_PARAM = Param(
    "all",
    "str",
    check.one_of(*ACTIVATIONS),
    "'all': every elementwise activation (ReLU, GELU, SiLU) gets the rule; 'relu': ReLUs only, "
    "as Captum's hooks on nn.ReLU modules",
)


GUIDED = GRADIENT.derive(_with_rule("guided"), activations=_ACTIVATIONS_PARAM)
DECONVOLUTION = GRADIENT.derive(_with_rule("deconvolution"), activations=_ACTIVATIONS_PARAM)


@GUIDED.method()
def guided_backprop(problem: Problem) -> Rule:
    """Guided backpropagation: the gradient with each activation passing ``relu(g * f'(x))``.

    For a ReLU this keeps the gradient only where the activation's input is positive *and* the
    incoming gradient is positive (Captum's ``GuidedBackprop``). For GELU and SiLU attrax applies
    the same formula to the activation's true local gradient ``g * f'(x)``; Captum only hooks
    ``nn.ReLU`` modules, so on a GELU/SiLU model Captum's ``GuidedBackprop`` is the plain
    gradient there: ``activations="relu"`` reproduces that.

    Arguments as :func:`saliency` (no ``abs``), plus:
        activations: ``"all"`` (default) or ``"relu"``: which activations get the rule.

    Returns:
        DataArray ``(target, source, hidden)`` (``example`` first for a list of inputs).

    >>> import attrax as ax
    >>> ax.guided_backprop(ax.load_model(), "1 2 3 =", " 3 2 1").dims
    ('target', 'source', 'hidden')
    """
    return Rule()


@DECONVOLUTION.method()
def deconvolution(problem: Problem) -> Rule:
    """Deconvolution: the gradient with each activation passing ``relu(g)`` back, whatever its input.

    For a ReLU this is Captum's ``Deconvolution`` (ReLU of the output gradient); attrax applies
    it to GELU and SiLU activations too, unless ``activations="relu"``.

    Arguments:
        model, inputs, targets and the common options: as :func:`attrax.saliency` (no ``abs``).
        activations: ``"all"`` (default) or ``"relu"``: which activations pass ``relu(g)``.

    Returns:
        DataArray ``([example,] target, source, hidden)``; ``([example,] target, source)`` with
        ``reduce_hidden``; ``layer`` after ``source`` with ``layers``.

    >>> import attrax as ax
    >>> ax.deconvolution(ax.load_model(), "1 2 3 =", " 3 2 1").attrs["method"]
    'deconvolution'
    """
    return Rule()


__all__ = ["ACTIVATIONS", "deconvolution", "guided_backprop"]
