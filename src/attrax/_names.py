"""The public names: each written once, with the module that defines it.

``attrax/__init__.py`` derives ``__all__`` and its lazy imports from this table; the CLI and
dataset runs resolve method names through it. It imports nothing, so reading it is free.
"""

from __future__ import annotations

#: public name -> the module (relative to the package) that defines it
PUBLIC: dict[str, str] = {
    # errors
    "AttraxError": "._errors",
    "InputError": "._errors",
    "ModelError": "._errors",
    "OptionError": "._errors",
    "ResourceError": "._errors",
    # models and objectives
    "Model": "._model",
    "load_model": "._model",
    "logit": "._objectives",
    "logprob": "._objectives",
    "probability": "._objectives",
    # attribution methods
    "saliency": "._gradients",
    "input_x_gradient": "._gradients",
    "integrated_gradients": "._gradients",
    "conductance": "._gradients",
    "internal_influence": "._gradients",
    "smoothgrad": "._gradients",
    "guided_backprop": "._guided",
    "deconvolution": "._guided",
    "deeplift": "._deeplift",
    "deeplift_shap": "._deeplift",
    "lrp": "._lrp",
    "sequential_integrated_gradients": "._paths",
    "guided_integrated_gradients": "._paths",
    "discretized_integrated_gradients": "._discrete",
    "greedy_pig": "._greedy",
    "pgd": "._adversarial",
    "squaregrad": "._gradients",
    "vargrad": "._gradients",
    "gradient_shap": "._gradients",
    "occlusion": "._perturbation",
    "feature_ablation": "._perturbation",
    "lime": "._perturbation",
    "kernel_shap": "._perturbation",
    "shapley_sampling": "._perturbation",
    "sobol": "._perturbation",
    "reagent": "._reagent",
    "attention": "._attention",
    "rollout": "._attention",
    "direct_logit_attribution": "._components",
    "attribution_patching": "._components",
    "activation_patching": "._components",
    "edge_attribution_patching": "._edges",
    "edge_patching": "._circuits",
    "top_edges": "._circuits",
    "circuit_faithfulness": "._circuits",
    "circuit_areas": "._circuits",
    "knowledge_neurons": "._neurons",
    "information_flow": "._routes",
    "GaussianNoise": "._components",
    "Ablation": "._components",
    "value_zeroing": "._mixing",
    "alti": "._mixing",
    "alti_logit": "._mixing",
    "attention_norm": "._mixing",
    "decompx": "._decompx",
    "attention_x_gradient": "._heads",
    "head_attribution": "._heads",
    # step scores and faithfulness
    "step_scores": "._scores",
    "with_scores": "._scores",
    "comprehensiveness": "._faithfulness",
    "deletion": "._faithfulness",
    "insertion": "._faithfulness",
    "loo_correlation": "._faithfulness",
    "sufficiency": "._faithfulness",
    "evaluate": "._evaluate",
    "summary": "._evaluate",
    "sanity_checks": "._evaluate",
    "stack_models": "._stacked",
    # reductions
    "absmax": "._reduce",
    "l2_norm": "._reduce",
    "max": "._reduce",
    "mean": "._reduce",
    "normalize": "._reduce",
    "pipe": "._reduce",
    "rescale": "._reduce",
    "sum": "._reduce",
    "merge_subwords": "._words",
    # datasets, files, pictures
    "attribute_dataset": "._dataset",
    "load_dataset_results": "._dataset",
    "load": ".io",
    "save": ".io",
    "plot": ".viz",
    "show": ".viz",
}

#: Attribution methods a CLI call or a dataset run may name.
METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "conductance",
    "internal_influence",
    "smoothgrad",
    "guided_backprop",
    "deconvolution",
    "lrp",
    "sequential_integrated_gradients",
    "guided_integrated_gradients",
    "discretized_integrated_gradients",
    "greedy_pig",
    "pgd",
    "squaregrad",
    "vargrad",
    "gradient_shap",
    "deeplift",
    "deeplift_shap",
    "occlusion",
    "feature_ablation",
    "lime",
    "kernel_shap",
    "shapley_sampling",
    "sobol",
    "reagent",
    "attention",
    "rollout",
    "direct_logit_attribution",
    "attribution_patching",
    "activation_patching",
    "edge_attribution_patching",
    "edge_patching",
    "knowledge_neurons",
    "information_flow",
    "value_zeroing",
    "alti",
    "alti_logit",
    "attention_norm",
    "decompx",
    "attention_x_gradient",
    "head_attribution",
)

#: Reductions a CLI ``--reduce`` spec or a dataset run may name.
REDUCTIONS = ("l2_norm", "sum", "mean", "max", "absmax", "normalize", "rescale")

# --- evaluation metrics (ax.evaluate, the CLI, ax.summary's plot) ----------------------------

#: faithfulness metric -> the variable of its curve that evaluate keeps
FAITHFULNESS = {
    "comprehensiveness": "aopc",
    "sufficiency": "aopc",
    "deletion": "auc",
    "insertion": "auc",
    "taucorr_loo": "tau",
}
PLAUSIBILITY = ("token_f1", "iou", "auprc")
AGREEMENT = ("spearman", "kendall", "topk_overlap")
METRICS = (*FAITHFULNESS, *PLAUSIBILITY, *AGREEMENT)
#: whether a higher value of the metric is better
HIGHER_IS_BETTER = {
    "comprehensiveness": True,
    "sufficiency": False,
    "deletion": False,
    "insertion": True,
    "taucorr_loo": True,
    **dict.fromkeys(PLAUSIBILITY, True),
}  # agreement has no better direction: two methods agreeing makes neither more faithful
