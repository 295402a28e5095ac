"""The shared harness: what every chapter uses and no chapter owns.

========================  ==========================================================================
module                    holds
========================  ==========================================================================
``validation``            the input guards (``require_int``, ``require_qkv``, ...): one set for all
``numerics``              ``rel_err``, ``assert_close``, ``seeded_randn``, ``accumulation_dtype``
``checking``              the exercise-checker engine (``Case``, ``check_function``, ``CheckResult``)
``guards``                the work guards checkers use: largest tensor, operations, FLOPs + elements written,
                          and the refusal of a library call
``measuring``             ``time_callable`` (the one timer), ``peak_memory_bytes``, ``sweep`` (one thread),
                          ``fit_power_law``, ``exponent_warning``
``contention``            how busy the machine is: ``busy_warning``, ``cpu_budget``, ``spare_cpus``, ``print_measured``
``costs``                 every byte and FLOP formula (KV cache, GQA/MLA/quantised caches, states, FLOPs)
``plotting``              ``plot_scaling``, ``plot_histories``
``widgets``               ``interactive_figure``: ipywidgets + plotly in every front end, a static fallback
``hardware``              the reader's machine: matmul GFLOP/s, copy bandwidth, the roofline
``settings``              seeding, quick mode, front end and plotly renderer, torch threads (one by default,
                          ``torch_threads``)
``data``                  the shipped data and its checksum manifest
``editions``              ``python -m labsupport.harness.editions``: student editions
``workspace``             ``python -m labsupport.harness.workspace``: a learner's workspace (``bin/lab``)
``envcheck``              ``python -m labsupport.harness.envcheck``: one OK/FAIL line per requirement
``stored``                the course's stored GPU runs under ``benchmarks/results/``: ``load_stored_json``,
                          ``find_stored_results``, ``profile_section`` (a stored torch.profiler table)
========================  ==========================================================================

The harness imports nothing from ``labsupport.lm`` or from any family. It
changes only with every test and notebook green.
"""
