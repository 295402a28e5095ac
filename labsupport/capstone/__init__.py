"""Chapter 10: choose by bottleneck. The one package, with ``hybrid``, that imports other families.

==============  ===============================================================================================
module          holds
==============  ===============================================================================================
``workloads``   ``Workload``, ``Hardware`` (this CPU from the reader's chapter-00 record or the shipped
                reference, a laptop GPU, an H100), ``MODELS``, the seven ``PROFILES``, ``workload_terms`` (the
                roofline's prefill / decode-KV / decode-weights seconds and memory GiB), ``name_bottleneck``,
                ``pressures``
``ranking``     ``load_frontier`` (chapter 07's rows through ``hybrid.widget.frontier_points``), ``design_terms``
                (a design's terms from the registry's state formulas at the model's width), ``rank_designs``
                (designs ranked on the bottleneck with quality risk), ``Candidate``
``measure``     ``predicted_vs_measured``: a tiny model's prefill and decode on this machine beside the roofline
``widget``      ``recommendation_figure``, ``recommendation_text``, ``explorer_controls``
``exercises``   ``check_bottleneck_terms``, ``check_cheapest_design``
==============  ===============================================================================================

The reader's own numbers come from the local results file of :mod:`labsupport.harness.results`; every number
the chapter shows says whether it is the reader's or the shipped reference.
"""

from labsupport.capstone.measure import Prediction, predicted_vs_measured, tiny_model, tiny_shape
from labsupport.capstone.ranking import Candidate, FrontierEvidence, design_terms, load_frontier, rank_designs
from labsupport.capstone.workloads import (
    BOTTLENECKS,
    HARDWARE,
    MODELS,
    PROFILES,
    Hardware,
    Workload,
    cpu_hardware,
    name_bottleneck,
    pressures,
    workload_terms,
)

__all__ = [
    "BOTTLENECKS",
    "HARDWARE",
    "MODELS",
    "PROFILES",
    "Candidate",
    "FrontierEvidence",
    "Hardware",
    "Prediction",
    "Workload",
    "cpu_hardware",
    "design_terms",
    "load_frontier",
    "name_bottleneck",
    "predicted_vs_measured",
    "pressures",
    "rank_designs",
    "tiny_model",
    "tiny_shape",
    "workload_terms",
]
