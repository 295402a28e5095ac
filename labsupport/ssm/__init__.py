"""Chapter 04: state-space models and scans, from the continuous ODE to Mamba-2.

==============  ==========================================================================================
module          holds
==============  ==========================================================================================
``scans``       the linear-recurrence scans: sequential, Hillis–Steele, Blelloch, log-space, chunked;
                the scan operator ``combine`` (the chunked scan has a reverse-scan backward)
``fused``       ``fused_selective_scan`` (from (Δ, A, B, C, x) block by block) and ``selective_scan_traffic``
``native``      ``native_scan``: the loop compiled to C++ on first use (one pass over memory; forward only)
``reference``   discretisation (ZOH, bilinear, exact ODE response), S4D init, kernel and FFT convolution,
                the selective scan and its one-token step, Mamba-2 / SSD (recurrent, quadratic, chunked)
``mixers``      ``MambaMixer`` (selective S6 or LTI S4D) and ``SSDMixer`` (Mamba-2) for the ``lm`` bench;
                their factories ``mamba_mixer``, ``ssd_mixer``
``widget``      the impulse-response explorer's data and figure
``exercises``   the chapter's checkers
==============  ==========================================================================================

Optional and not imported here: ``labsupport.ssm.triton_scan`` (``ssd_scan_triton``), the SSD recurrence as one
fused Triton kernel with the state in registers, the honest GPU baseline for the chunked SSD.
"""

from labsupport.ssm.exercises import (
    check_chunked_scan,
    check_combine,
    check_fft_conv,
    check_selective_step,
    check_ssd_chunked,
    check_zoh,
)
from labsupport.ssm.fused import fused_selective_scan, selective_scan_traffic
from labsupport.ssm.mixers import MambaMixer, SSDMixer, mamba_mixer, ssd_mixer
from labsupport.ssm.native import native_scan, native_scan_available, native_selective_scan
from labsupport.ssm.reference import (
    bilinear,
    exact_response,
    fft_causal_conv,
    lti_recurrence,
    s4d_init,
    selective_scan,
    selective_step,
    ssd_chunked,
    ssd_quadratic,
    ssd_recurrent,
    ssm_kernel,
    zoh,
)
from labsupport.ssm.scans import (
    SCANS,
    blelloch_scan,
    chunked_scan,
    combine,
    hillis_steele_scan,
    log_space_scan,
    sequential_scan,
)
from labsupport.ssm.widget import (
    ImpulseResponseData,
    LearnedSteps,
    impulse_response_data,
    impulse_response_figure,
    learned_step_sizes,
    learned_steps_figure,
)

__all__ = [
    "SCANS", "ImpulseResponseData", "LearnedSteps", "MambaMixer", "learned_step_sizes", "learned_steps_figure", "bilinear", "blelloch_scan", "check_combine", "check_fft_conv",
    "check_chunked_scan", "check_selective_step", "check_ssd_chunked", "check_zoh", "chunked_scan", "combine", "exact_response",
    "fft_causal_conv", "fused_selective_scan", "selective_scan_traffic", "hillis_steele_scan", "impulse_response_data", "impulse_response_figure", "log_space_scan",
    "lti_recurrence", "mamba_mixer", "native_scan", "native_scan_available", "native_selective_scan", "s4d_init", "selective_scan", "selective_step", "sequential_scan",
    "ssd_chunked", "ssd_quadratic", "ssd_recurrent", "ssm_kernel", "zoh",
]
