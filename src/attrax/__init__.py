"""attrax: functional attribution for Hugging Face sequence models, labelled as xarray.

>>> import attrax as ax
>>> attribute = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)
>>> scores = attribute(ax.load_model(), "1 2 3 =", " 3 2 1")
>>> scores.dims
('target', 'source')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._attention import attention as attention
    from ._attention import rollout as rollout
    from ._dataset import attribute_dataset as attribute_dataset
    from ._dataset import load_dataset_results as load_dataset_results
    from ._errors import AttraxError as AttraxError
    from ._errors import InputError as InputError
    from ._errors import ModelError as ModelError
    from ._errors import OptionError as OptionError
    from ._faithfulness import comprehensiveness as comprehensiveness
    from ._faithfulness import deletion as deletion
    from ._faithfulness import insertion as insertion
    from ._faithfulness import sufficiency as sufficiency
    from ._gradients import input_x_gradient as input_x_gradient
    from ._gradients import integrated_gradients as integrated_gradients
    from ._gradients import quadrature as quadrature
    from ._gradients import saliency as saliency
    from ._gradients import smoothgrad as smoothgrad
    from ._model import Model as Model
    from ._model import load_model as load_model
    from ._objectives import logit as logit
    from ._objectives import logprob as logprob
    from ._objectives import probability as probability
    from ._perturbation import kernel_shap as kernel_shap
    from ._perturbation import lime as lime
    from ._perturbation import occlusion as occlusion
    from ._reduce import absmax as absmax
    from ._reduce import l2_norm as l2_norm
    from ._reduce import max as max
    from ._reduce import mean as mean
    from ._reduce import normalize as normalize
    from ._reduce import pipe as pipe
    from ._reduce import rescale as rescale
    from ._reduce import sum as sum
    from ._scores import step_scores as step_scores
    from ._scores import with_scores as with_scores
    from ._words import merge_subwords as merge_subwords
    from .io import load as load
    from .io import save as save
    from .viz import plot as plot
    from .viz import show as show

__version__ = "0.1.0"

# name -> submodule: `import attrax` stays cheap (no torch, no transformers) until a name is
# used, so `attrax --help` and argument errors answer at once
_WHERE = {
    "attention": "._attention",
    "rollout": "._attention",
    "attribute_dataset": "._dataset",
    "load_dataset_results": "._dataset",
    "AttraxError": "._errors",
    "InputError": "._errors",
    "ModelError": "._errors",
    "OptionError": "._errors",
    "comprehensiveness": "._faithfulness",
    "deletion": "._faithfulness",
    "insertion": "._faithfulness",
    "sufficiency": "._faithfulness",
    "input_x_gradient": "._gradients",
    "integrated_gradients": "._gradients",
    "quadrature": "._gradients",
    "saliency": "._gradients",
    "smoothgrad": "._gradients",
    "Model": "._model",
    "load_model": "._model",
    "logit": "._objectives",
    "logprob": "._objectives",
    "probability": "._objectives",
    "kernel_shap": "._perturbation",
    "lime": "._perturbation",
    "occlusion": "._perturbation",
    "absmax": "._reduce",
    "l2_norm": "._reduce",
    "max": "._reduce",
    "mean": "._reduce",
    "normalize": "._reduce",
    "pipe": "._reduce",
    "rescale": "._reduce",
    "sum": "._reduce",
    "step_scores": "._scores",
    "with_scores": "._scores",
    "merge_subwords": "._words",
    "load": ".io",
    "save": ".io",
    "plot": ".viz",
    "show": ".viz",
}

__all__ = [
    "AttraxError",
    "InputError",
    "Model",
    "ModelError",
    "OptionError",
    "__version__",
    "absmax",
    "attention",
    "attribute_dataset",
    "comprehensiveness",
    "deletion",
    "input_x_gradient",
    "insertion",
    "integrated_gradients",
    "kernel_shap",
    "l2_norm",
    "lime",
    "load",
    "load_dataset_results",
    "load_model",
    "logit",
    "logprob",
    "max",
    "mean",
    "merge_subwords",
    "normalize",
    "occlusion",
    "pipe",
    "plot",
    "probability",
    "quadrature",
    "rescale",
    "rollout",
    "saliency",
    "save",
    "show",
    "smoothgrad",
    "step_scores",
    "sufficiency",
    "sum",
    "with_scores",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
