"""attrax: functional attribution for Hugging Face sequence models, labelled as xarray.

>>> import attrax as ax
>>> attribute = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)
>>> relevance = attribute(ax.load_model(), "1 2 3 =", " 3 2 1")
>>> relevance.dims
('target', 'source')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._adversarial import pgd as pgd
    from ._attention import attention as attention
    from ._attention import rollout as rollout
    from ._circuits import circuit_areas as circuit_areas
    from ._circuits import circuit_faithfulness as circuit_faithfulness
    from ._circuits import edge_patching as edge_patching
    from ._circuits import top_edges as top_edges
    from ._components import Ablation as Ablation
    from ._components import GaussianNoise as GaussianNoise
    from ._components import activation_patching as activation_patching
    from ._components import attribution_patching as attribution_patching
    from ._components import direct_logit_attribution as direct_logit_attribution
    from ._dataset import attribute_dataset as attribute_dataset
    from ._dataset import load_dataset_results as load_dataset_results
    from ._decompx import decompx as decompx
    from ._deeplift import deeplift as deeplift
    from ._deeplift import deeplift_shap as deeplift_shap
    from ._discrete import discretized_integrated_gradients as discretized_integrated_gradients
    from ._edges import edge_attribution_patching as edge_attribution_patching
    from ._errors import AttraxError as AttraxError
    from ._errors import InputError as InputError
    from ._errors import ModelError as ModelError
    from ._errors import OptionError as OptionError
    from ._errors import ResourceError as ResourceError
    from ._evaluate import evaluate as evaluate
    from ._evaluate import sanity_checks as sanity_checks
    from ._evaluate import summary as summary
    from ._faithfulness import comprehensiveness as comprehensiveness
    from ._faithfulness import deletion as deletion
    from ._faithfulness import insertion as insertion
    from ._faithfulness import loo_correlation as loo_correlation
    from ._faithfulness import sufficiency as sufficiency
    from ._gradients import conductance as conductance
    from ._gradients import gradient_shap as gradient_shap
    from ._gradients import input_x_gradient as input_x_gradient
    from ._gradients import integrated_gradients as integrated_gradients
    from ._gradients import internal_influence as internal_influence
    from ._gradients import saliency as saliency
    from ._gradients import smoothgrad as smoothgrad
    from ._gradients import squaregrad as squaregrad
    from ._gradients import vargrad as vargrad
    from ._greedy import greedy_pig as greedy_pig
    from ._guided import deconvolution as deconvolution
    from ._guided import guided_backprop as guided_backprop
    from ._heads import attention_x_gradient as attention_x_gradient
    from ._heads import head_attribution as head_attribution
    from ._lrp import lrp as lrp
    from ._mixing import alti as alti
    from ._mixing import alti_logit as alti_logit
    from ._mixing import attention_norm as attention_norm
    from ._mixing import value_zeroing as value_zeroing
    from ._model import Model as Model
    from ._model import load_model as load_model
    from ._neurons import knowledge_neurons as knowledge_neurons
    from ._objectives import logit as logit
    from ._objectives import logprob as logprob
    from ._objectives import probability as probability
    from ._paths import guided_integrated_gradients as guided_integrated_gradients
    from ._paths import sequential_integrated_gradients as sequential_integrated_gradients
    from ._perturbation import feature_ablation as feature_ablation
    from ._perturbation import kernel_shap as kernel_shap
    from ._perturbation import lime as lime
    from ._perturbation import occlusion as occlusion
    from ._perturbation import shapley_sampling as shapley_sampling
    from ._perturbation import sobol as sobol
    from ._reagent import reagent as reagent
    from ._reduce import absmax as absmax
    from ._reduce import l2_norm as l2_norm
    from ._reduce import max as max
    from ._reduce import mean as mean
    from ._reduce import normalize as normalize
    from ._reduce import pipe as pipe
    from ._reduce import rescale as rescale
    from ._reduce import sum as sum
    from ._routes import information_flow as information_flow
    from ._scores import step_scores as step_scores
    from ._scores import with_scores as with_scores
    from ._stacked import stack_models as stack_models
    from ._words import merge_subwords as merge_subwords
    from .io import load as load
    from .io import save as save
    from .viz import plot as plot
    from .viz import show as show

from ._names import PUBLIC
from ._version import __version__

# `import attrax` stays cheap (no torch, no transformers) until a name is used, so
# `attrax --help` and argument errors answer at once
__all__ = ["__version__", *sorted(PUBLIC)]


def __getattr__(name: str) -> Any:
    module = PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
