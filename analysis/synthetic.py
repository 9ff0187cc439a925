"""Synthetic HCC-after-TACE cohort: arterial-phase MR-like volumes, masks and a clinical table.

No real patient data exists on the project's machines, so every part of the pipeline runs on this
generator. ``python -m analysis synth --out DIR --patients N --shape S --seed K`` (or
:func:`make_cohort`) writes the cohort folder of docs/contracts.md::

    images/<pid>/t{0,1,2}.nii.gz   labels/<pid>/t{0,1,2}.nii.gz   clinical.csv   cohort.json

Patient ids are ``HCC001``, ``HCC002``, ... The draws come from
``numpy.random.SeedSequence(seed).spawn(n)``, one child per patient (split into a plan seed and
a scan seed), so patient ``i`` is the same whatever ``n_patients`` and whatever order patients
are rendered in; :func:`make_clinical` gives the same clinical table without making images.

1. **Patient plan** (:func:`make_clinical`, no images). A latent prognosis ``z ~ N(0, 1)``
   (higher = worse) drives, through Gaussian copulas that keep the paper's Table 1 marginals,
   BCLC (more often A with TACE+MWA), AFP >= 400, tumour size, nodule count, sorafenib, Child-Pugh
   and the expert ``imaging_high_risk`` flag (correlation RHO). Overall survival is Weibull
   proportional hazards: log-hazard ``BETA_Z * z`` (HR ~7 per SD, steep so that the 4-class
   label is learnable) + ``BETA_SORAFENIB`` (protective) + ``BETA_AGE_PER_10Y``; uniform
   administrative censoring plus random drop-out leave ~25 % censored. TACE cycles: 1 + negative
   binomial, at most one per TACE_INTERVAL_MONTHS of follow-up. The lesions' course follows
   ``g = z + noise``: good prognosis = shrinkage and a large non-enhancing (necrotic / lipiodol)
   part, poor prognosis = growth, little necrosis and new lesions. TACE+MWA ablates the dominant
   nodule after t0 (a non-enhancing ablation zone, residual viable tumour only when g is high).
   High imaging risk is visible: 2-4 satellite nodules next to the dominant one, irregular
   margins, heterogeneous enhancement (+/-30 %) and, mostly, a peritumoral enhancing rim.
   ``mrecist`` is the best response from the plan's viable diameters (see :func:`_best_mrecist`;
   6 % are ``NA``, "not assessed", as in Table 1). ``risk_class`` uses
   ``analysis.cohort.derive_risk_class``. The ``latent_*`` columns of :func:`make_clinical`
   (z, g, event/censoring times, lesion count, tumour and viable volume in mL and the sum of
   target viable diameters in mm per time point, satellites, heterogeneity) are the generator's
   truth; clinical.csv does not carry them.
2. **Anatomy** in a *real-size body frame* (mm of a real abdomen, RAS+: body 330 x 240 mm with
   8-25 mm of subcutaneous fat, a lobulated liver on the patient's right (three ellipsoids in a
   smoothly warped frame) with bright arterial vessels, spleen, aorta, spine) mapped onto each
   scan's field of view: in-plane by ``sx = 0.552 S / 165`` (the body fills ~92 % of the
   smallest field of view, 1.2 mm x S), cranio-caudally so the liver spans ~60 % of the slab.
   **At small S the body is small**: a matrix of S shows a scaled abdomen (right lobe ~73 mm wide at
   S = 128, ~18 mm at S = 32). Lesions are drawn ``lesion_gain(S)`` times larger than the
   anatomy so that they appear at 0.7x their nominal diameter in image mm for S >= 96 (capped at
   x2.5 below: 0.54x at S = 64, 0.27x at S = 32); every lesion covers at least one voxel.
   A patient whose lesions would then exceed half the liver at some time point
   (MAX_TUMOUR_BURDEN, :func:`burden_gain_limit`) gets a smaller gain for all three scans.
   Ratios (response, growth) do not depend on S.
3. **Scans**: per scan an in-plane spacing drawn in 1.2-1.8 mm, 5 mm slices, ``max(8,
   round(0.4 S))`` slices, a small rotation (~1-2.5 deg) and origin shift (~6 mm), so time points
   are not aligned (their affines differ; the anatomy stays put in world space); an orientation
   per patient (ORIENTATIONS: RAS, LPS, LAS, RPS, LPI, PRS, ALS, realised with
   ``nibabel.orientations`` flips/permutations of the stored array and the matching affine); a
   smooth multiplicative bias field (exp of a quadratic, ~+/-20 %), light in-plane partial-volume
   blur, Rician noise (magnitude of complex Gaussian, SNR ~15-30 in liver), a per-scan intensity
   scale and offset; int16 for ~80 % of scans, float32 for the rest. Labels (uint8 0/1/2) share
   each image's shape and affine exactly.

Contrast (arbitrary units before bias, noise and scaling): air 0, muscle/organs 0.35, fat 0.8,
liver 0.5, arterial vessels 0.9, aorta 1.2, peritumoral rim 0.62 (labelled liver), viable HCC
1.0 x (1 +/- heterogeneity), never below 0.7 = 1.4x liver (arterial hyperenhancement),
necrotic / lipiodol part 0.18 = 0.36x liver (darker than liver). The tumour label covers the
whole lesion (viable + necrotic), so "viable = tumour voxels brighter than the surrounding liver"
(analysis.mrecist) recovers the viable part.

Files are byte-identical for a seed: nibabel's gzip writer stores no file name and mtime 0, and
nothing depends on time or on the order patients are made in.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import ndtri

from analysis.cohort import REQUIRED_COLUMNS, TIMEPOINTS, derive_risk_class
from analysis.io import save_nifti, write_csv, write_json

log = logging.getLogger(__name__)

GENERATOR = "analysis.synthetic"
#: present in a cohort folder while ``make_cohort`` writes it; left behind by an interrupted run
INCOMPLETE_MARKER = ".synth_incomplete.json"
VERSION = 1
SLICE_THICKNESS_MM = 5.0
SPACING_RANGE_MM = (1.2, 1.8)
#: orientations patients are stored in (axis codes of the stored array), drawn per patient
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "RPS", "LPI", "PRS", "ALS")

# ---- clinical marginals: the paper's Table 1 (N = 181) --------------------------------------
P_TACE = 110 / 181
AGE_MEAN, AGE_SD = 65.6, 10.9
P_MALE = {"TACE": 0.791, "TACE+MWA": 0.901}
AETIOLOGY = {"HCV": 0.260, "HBV": 0.138, "Alcohol": 0.564, "NASH": 0.050}
BCLC = {"TACE": (0.209, 0.573, 0.218), "TACE+MWA": (0.408, 0.465, 0.127)}
TUMOUR_SIZE = {"TACE": (0.464, 0.364, 0.173), "TACE+MWA": (0.718, 0.239, 0.042)}
P_CHILD_NA, P_CHILD_B_GIVEN_KNOWN = 0.171, 0.204 / (0.624 + 0.204)
P_SORAFENIB, P_AFP, P_NODULES_GT3 = 0.221, 0.564, 0.696
#: 1 + negative binomial, capped by follow-up time (TACE_INTERVAL_MONTHS): mean 5.1, SD 4.4, skewed
TACE_EXTRA_MEAN, TACE_SD = 5.2, 5.6
TACE_INTERVAL_MONTHS = 2.0
P_HIGH_RISK = 0.5
MAX_DIAMETER_MM = 95.0
#: lesions appear in the images at this fraction of their nominal diameter (S >= ~100), see
#: lesion_gain; mRECIST measurability (10 mm) is applied to the imaged size
IMAGED_MM_PER_NOMINAL_MM = 0.7
MAX_LESION_GAIN = 2.5
#: lesions are drawn no larger than keeps every time point's tumour volume at or below this share
#: of the liver's volume: TACE candidates keep most of their liver (tumour over half of the liver
#: is an Okuda criterion and a usual contraindication to TACE), see burden_gain_limit
MAX_TUMOUR_BURDEN = 0.5
#: lesion gain at S = 128 (real body-frame size of a lesion / nominal size), used for placement
REFERENCE_GAIN = IMAGED_MM_PER_NOMINAL_MM / (0.552 * 128 / 165.0)
PLACEMENT_TRIES = 40
NEW_LESION_DISTANCE_MM = 40.0
#: new lesions per follow-up ~ Poisson(RATE[t] * max(g - FROM_G (+0.2 at t2), 0))
NEW_LESION_RATE, NEW_LESION_FROM_G = (1.2, 1.5), 0.1
MEASURABLE_MM = 10.0
P_MRECIST_MISSING = 0.06  # "N/A" in Table 1: response not assessed
# viable fraction after TACE = clip(GAIN * sigmoid(1.8 g + SHIFT[t] + noise) - FLOOR, 0, 1): tuned
# so that best mRECIST response is near Table 1 (CR 5.5, PR 37, SD 28, PD 23, N/A 6 %)
VIABLE_GAIN, VIABLE_FLOOR, VIABLE_SHIFT = 1.04, 0.03, (-0.3, 0.0)

# ---- survival model ---------------------------------------------------------------------------
BETA_Z = 2.0  # log hazard ratio per SD of the latent prognosis: steep, so OS is learnable
BETA_SORAFENIB = -0.5  # protective
BETA_AGE_PER_10Y = 0.15
WEIBULL_SHAPE = 1.6
OS_MEDIAN_AT_ZERO = 38.0  # months, at z = 0, no sorafenib, mean age (paper: median OS 36)
ADMIN_CENSOR_MONTHS = (36.0, 220.0)  # uniform entry over the follow-up window
DROPOUT_MEAN_MONTHS = 800.0

# ---- copula correlations with z ---------------------------------------------------------------
RHO = {"bclc": 0.45, "afp": 0.35, "size": 0.45, "nodules": 0.35, "sorafenib": 0.25,
       "child": 0.2, "high_risk": 0.45}

# ---- contrast (see module docstring) -----------------------------------------------------------
INT_AIR, INT_TISSUE, INT_FAT, INT_LIVER = 0.0, 0.35, 0.8, 0.5
INT_VESSEL, INT_AORTA, INT_SPINE, INT_SPLEEN = 0.9, 1.2, 0.25, 0.55
INT_VIABLE, INT_NECROTIC = 1.0, 0.18
INT_PERITUMORAL = 0.62  # arterial peritumoral enhancement around high-risk lesions (label: liver)
PERITUMORAL_MM = 5.0
BODY_HALF_AXES_MM = (165.0, 120.0)  # real-size abdomen, left-right and antero-posterior

CLINICAL_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + ("aetiology", "risk_class", "mrecist")


# =============================================================================== patient plan
@dataclass
class Lesion:
    """One lesion in the real-size body frame; diameters (mm) and viable fraction per time point.

    ``viable[t]`` is the enhancing volume fraction. The viable part is a ball of diameter
    ``diameter * viable ** (1/3)`` inside the lesion, touching its margin on the side ``normal``
    (nodular residual tumour at the edge of a lipiodol-laden / necrotic lesion); the rest of the
    lesion is necrotic. Its longest axial diameter is the ball's (:meth:`viable_diameter`).
    """

    centre: np.ndarray  # (3,) real mm
    diameter: tuple[float, float, float]  # per time point, 0 = absent
    viable: tuple[float, float, float]
    normal: np.ndarray  # (3,) unit, z = 0
    kind: str  # "nodule", "satellite", "new"
    irregularity: float  # margin deformation amplitude
    shape_freqs: np.ndarray  # (k, 3) for the margin deformation
    shape_phases: np.ndarray

    def viable_diameter(self, t: int) -> float:
        d, v = self.diameter[t], self.viable[t]
        return d * v ** (1.0 / 3.0) if d > 0 and v > 0 else 0.0


@dataclass
class PatientPlan:
    patient_id: str
    clinical: dict
    latent: dict
    lesions: list[Lesion] = field(default_factory=list)
    liver_lobes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (centre, radii)
    liver_warp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # freqs, phases, amps
    vessels: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)  # a, b, radius
    texture: tuple[np.ndarray, np.ndarray] | None = None  # freqs, phases
    heterogeneity: float = 0.05
    peritumoral: bool = False
    fat_mm: float = 15.0


def _patient_seeds(n_patients: int, seed: int) -> list[tuple[np.random.SeedSequence, np.random.SeedSequence]]:
    """Per patient (plan seed, scan seed): independent of n_patients for the first patients."""
    children = np.random.SeedSequence(int(seed)).spawn(int(n_patients))
    return [tuple(c.spawn(2)) for c in children]


def _copula(rng: np.random.Generator, z: float, rho: float) -> float:
    """Standard normal correlated ``rho`` with z: cut at normal quantiles to keep the marginals."""
    return rho * z + math.sqrt(1.0 - rho * rho) * rng.standard_normal()


def _ordinal(u: float, probs) -> int:
    cuts = ndtri(np.cumsum(probs)[:-1] / np.sum(probs))
    return int(np.searchsorted(cuts, u))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _plan_patient(index: int, ss: np.random.SeedSequence) -> PatientPlan:
    rng = np.random.default_rng(ss)
    pid = f"HCC{index + 1:03d}"
    z = float(rng.standard_normal())
    treatment = "TACE" if rng.random() < P_TACE else "TACE+MWA"
    age = float(np.clip(rng.normal(AGE_MEAN, AGE_SD), 25, 95))
    sex = "M" if rng.random() < P_MALE[treatment] else "F"
    aetiology = list(AETIOLOGY)[int(rng.choice(len(AETIOLOGY), p=np.array(list(AETIOLOGY.values())) / sum(AETIOLOGY.values())))]
    bclc = "ABC"[_ordinal(_copula(rng, z, RHO["bclc"]), BCLC[treatment])]
    afp = int(_copula(rng, z, RHO["afp"]) > ndtri(1 - P_AFP))
    size_cat = _ordinal(_copula(rng, z, RHO["size"]), TUMOUR_SIZE[treatment])
    nodules_gt3 = int(_copula(rng, z, RHO["nodules"]) > ndtri(1 - P_NODULES_GT3))
    sorafenib = int(_copula(rng, z, RHO["sorafenib"]) > ndtri(1 - P_SORAFENIB))
    u_child = _copula(rng, z, RHO["child"])
    child = "NA" if rng.random() < P_CHILD_NA else ("B" if u_child > ndtri(1 - P_CHILD_B_GIVEN_KNOWN) else "A")
    high_risk = int(_copula(rng, z, RHO["high_risk"]) > ndtri(1 - P_HIGH_RISK))
    # negative binomial with mean TACE_EXTRA_MEAN and variance TACE_SD^2
    p_nb = TACE_EXTRA_MEAN / TACE_SD**2
    r_nb = TACE_EXTRA_MEAN * p_nb / (1 - p_nb)
    tace_extra = int(rng.negative_binomial(r_nb, p_nb))

    # overall survival: Weibull PH, S(t | x) = exp(-(t / scale)^k * exp(lp))
    lp = BETA_Z * z + BETA_SORAFENIB * sorafenib + BETA_AGE_PER_10Y * (age - AGE_MEAN) / 10.0
    scale = OS_MEDIAN_AT_ZERO / math.log(2.0) ** (1.0 / WEIBULL_SHAPE)
    t_event = scale * (rng.exponential() * math.exp(-lp)) ** (1.0 / WEIBULL_SHAPE)
    t_censor = min(rng.uniform(*ADMIN_CENSOR_MONTHS), rng.exponential(DROPOUT_MEAN_MONTHS))
    death = int(t_event <= t_censor)
    os_months = round(max(min(t_event, t_censor), 0.5), 1)
    # on-demand TACE needs time: at most one session every TACE_INTERVAL_MONTHS of follow-up
    tace_cycles = 1 + min(tace_extra, int(os_months // TACE_INTERVAL_MONTHS))

    # response latent: the prognosis as seen on images (a little noise so images do not give z)
    g = z + 0.25 * rng.standard_normal()

    plan = PatientPlan(pid, {}, {})
    _plan_anatomy(rng, plan)
    _plan_lesions(rng, plan, g=g, size_cat=size_cat, n_main=int(rng.integers(4, 6)) if nodules_gt3 else int(rng.integers(1, 4)),
                  high_risk=high_risk, treatment=treatment)
    mrecist, sums = _best_mrecist(plan.lesions)
    if rng.random() < P_MRECIST_MISSING:
        mrecist = "NA"

    plan.clinical = {
        "patient_id": pid, "age": round(age), "sex": sex, "treatment": treatment, "sorafenib": sorafenib,
        "os_months": os_months, "death": death, "bclc": bclc, "child_pugh": child, "afp_ge_400": afp,
        "tumour_size": ("<3cm", "3-5cm", ">5cm")[size_cat], "nodules_gt3": nodules_gt3,
        "tace_cycles": tace_cycles, "imaging_high_risk": high_risk, "aetiology": aetiology, "mrecist": mrecist,
    }
    latent = {"latent_z": z, "latent_g": g, "latent_t_event_months": t_event, "latent_t_censor_months": t_censor}
    for t, tp in enumerate(TIMEPOINTS):
        present = [les for les in plan.lesions if les.diameter[t] > 0]
        vol = sum(math.pi / 6 * les.diameter[t] ** 3 for les in present) / 1000.0
        viable_vol = sum(math.pi / 6 * les.diameter[t] ** 3 * les.viable[t] for les in present) / 1000.0
        latent[f"latent_n_lesions_{tp}"] = len(present)
        latent[f"latent_tumour_ml_{tp}"] = vol
        latent[f"latent_viable_ml_{tp}"] = viable_vol
        latent[f"latent_sum_viable_mm_{tp}"] = sums[t]
    latent["latent_n_satellites"] = sum(les.kind == "satellite" for les in plan.lesions)
    latent["latent_heterogeneity"] = plan.heterogeneity
    plan.latent = latent
    return plan


def _viable(logit: float) -> float:
    """Viable fraction from a logit; below ~3 % the lesion counts as completely necrotic."""
    return float(np.clip(VIABLE_GAIN * _sigmoid(logit) - VIABLE_FLOOR, 0.0, 1.0))


def _random_fourier(rng: np.random.Generator, n: int, wavelength_mm: float) -> tuple[np.ndarray, np.ndarray]:
    freqs = rng.standard_normal((n, 3)) * (2 * math.pi / wavelength_mm)
    phases = rng.uniform(0, 2 * math.pi, n)
    return freqs, phases


def _plan_anatomy(rng: np.random.Generator, plan: PatientPlan) -> None:
    jitter = lambda s: rng.uniform(1 - s, 1 + s)
    # real-size body frame in RAS+ mm (+x = patient's right): the liver sits at +x
    plan.liver_lobes = [
        (np.array([58.0, -5.0, -5.0]) * jitter(0.1), np.array([85.0, 92.0, 80.0]) * jitter(0.1)),  # right lobe
        (np.array([-25.0, 35.0, 15.0]) * jitter(0.15), np.array([65.0, 45.0, 45.0]) * jitter(0.12)),  # left lobe
        (np.array([15.0, -20.0, 10.0]) * jitter(0.2), np.array([25.0, 22.0, 30.0]) * jitter(0.15)),  # caudate
    ]
    freqs, phases = _random_fourier(rng, 6, 140.0)
    plan.liver_warp = (freqs, phases, rng.uniform(4.0, 9.0, 6))
    hilum = np.array([25.0, 5.0, 0.0])
    vessels = []
    for _ in range(int(rng.integers(5, 9))):
        direction = rng.standard_normal(3)
        direction[2] *= 0.5
        direction /= np.linalg.norm(direction)
        length = rng.uniform(40.0, 80.0)
        a = hilum + rng.normal(0, 5, 3)
        b = a + direction * length
        vessels.append((a, b, float(rng.uniform(2.0, 4.0))))
        # one branch off each trunk
        mid = a + (b - a) * rng.uniform(0.4, 0.7)
        d2 = rng.standard_normal(3)
        d2 /= np.linalg.norm(d2)
        vessels.append((mid, mid + d2 * rng.uniform(20.0, 40.0), float(rng.uniform(1.5, 2.5))))
    plan.vessels = vessels
    plan.texture = _random_fourier(rng, 12, 18.0)
    plan.fat_mm = float(rng.uniform(8.0, 25.0))


def _inside_liver_points(rng: np.random.Generator, plan: PatientPlan, margin_mm: float, n: int) -> np.ndarray:
    """n points at least ``margin_mm`` inside one of the liver's lobes (by volume: right lobe favoured)."""
    lobes = plan.liver_lobes[:2]
    weights = np.array([np.prod(r) for _, r in lobes])
    which = rng.choice(len(lobes), size=n, p=weights / weights.sum())
    u = rng.standard_normal((n, 3))
    u = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.random((n, 1)) ** (1 / 3)
    centres = np.array([c for c, _ in lobes])[which]
    inner = np.maximum(np.array([r for _, r in lobes]) - margin_mm, 5.0)[which]
    return centres + u * inner * 0.9


def _liver_depth(plan: PatientPlan, points: np.ndarray) -> np.ndarray:
    """> 0 inside the liver's (unwarped) lobes, larger deeper inside."""
    return np.max([1.0 - np.sqrt((((points - c) / r) ** 2).sum(-1)) for c, r in plan.liver_lobes], axis=0)


def _place(rng: np.random.Generator, plan: PatientPlan, placed: list[Lesion], d_max: float, kind: str) -> np.ndarray:
    """A lesion centre in the liver that keeps lesions apart as imaged at S = 128 (separate
    connected components for mRECIST); new lesions also lie > 15 mm as imaged from every older
    lesion, so that a follow-up reader sees them as new. Best of a few tries when the liver is full."""
    candidates = _inside_liver_points(rng, plan, 0.5 * d_max * REFERENCE_GAIN + 3.0, PLACEMENT_TRIES)
    if not placed:
        return candidates[0]
    others = np.array([o.centre for o in placed])
    need = 0.5 * (d_max + np.array([max(o.diameter) for o in placed])) * REFERENCE_GAIN + 4.0
    if kind == "new":
        older = np.array([o.kind != "new" for o in placed])
        need = np.where(older, np.maximum(need, NEW_LESION_DISTANCE_MM), need)
    slack = (np.linalg.norm(candidates[:, None, :] - others[None], axis=-1) - need).min(axis=1)
    ok = np.flatnonzero(slack >= 0)
    return candidates[ok[0]] if ok.size else candidates[int(np.argmax(slack))]


def _new_lesion(rng, plan, diameters, viable, kind, irregularity, centre=None, placed=()) -> Lesion:
    if centre is None:
        centre = _place(rng, plan, list(placed), max(diameters), kind)
    angle = rng.uniform(0, 2 * math.pi)
    freqs, phases = _random_fourier(rng, 5, 1.0)
    return Lesion(centre=np.asarray(centre, float), diameter=tuple(float(d) for d in diameters),
                  viable=tuple(float(v) for v in viable), normal=np.array([math.cos(angle), math.sin(angle), 0.0]),
                  kind=kind, irregularity=float(irregularity), shape_freqs=freqs * 2.0, shape_phases=phases)


def _plan_lesions(rng, plan: PatientPlan, g: float, size_cat: int, n_main: int, high_risk: int, treatment: str) -> None:
    lo, hi = ((15.0, 29.0), (30.0, 50.0), (51.0, 80.0))[size_cat]
    d_max = rng.uniform(lo, hi)
    plan.heterogeneity = float(rng.uniform(0.22, 0.3) if high_risk else rng.uniform(0.02, 0.06))
    irregular = float(rng.uniform(0.18, 0.28) if high_risk else rng.uniform(0.0, 0.05))
    plan.peritumoral = bool(rng.random() < (0.7 if high_risk else 0.05))
    # per-step diameter factor: shrink when g < 0, grow when g > 0
    step = lambda: math.exp(0.05 + 0.22 * g + 0.04 * rng.standard_normal())

    def grow(d: float, d_first: float) -> float:
        # treated lesions stay visible as a necrotic / lipiodol-laden remnant (>= 45 % of the first
        # diameter); growth is capped so the liver is never swallowed
        return float(np.clip(d * step(), max(0.45 * d_first, 5.0), min(1.6 * d, MAX_DIAMETER_MM)))
    # enhancing (viable) fraction after TACE: small when the prognosis is good, 0 = complete necrosis
    viable_fraction = lambda shift: _viable(1.8 * g + shift + 0.3 * rng.standard_normal())
    lesions = []
    for k in range(n_main):
        d0 = d_max if k == 0 else d_max * rng.uniform(0.35, 0.85)
        d0 = max(d0, 8.0)
        d1 = grow(d0, d0)
        d2 = grow(d1, d0)
        v0 = 1.0 if not high_risk else float(rng.uniform(0.8, 1.0))
        v1, v2 = viable_fraction(VIABLE_SHIFT[0]), viable_fraction(VIABLE_SHIFT[1])
        if treatment == "TACE+MWA" and k == 0:
            # the dominant nodule is ablated after the first TACE: an ablation zone a bit larger
            # than the tumour, non-enhancing unless the prognosis is poor (residual viable rim)
            d1 = d0 * 1.15 * (1 + max(g, 0) * 0.1)
            d2 = grow(d1, d0)
            v1, v2 = _viable(2.0 * g - 2.0), _viable(2.2 * g - 1.5)
        lesions.append(_new_lesion(rng, plan, (d0, d1, d2), (v0, v1, v2), "nodule", irregular, placed=lesions))
    if high_risk:
        dominant = lesions[0]
        for _ in range(int(rng.integers(2, 5))):
            directions = rng.standard_normal((PLACEMENT_TRIES, 3))
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            ds = rng.uniform(5.0, 9.0)
            d1s = grow(ds, ds)
            d2s = grow(d1s, ds)
            # just outside the dominant nodule as imaged: a separate, nearby focus, in the liver
            reach = 0.5 * (max(dominant.diameter) + max(ds, d1s, d2s)) * REFERENCE_GAIN + rng.uniform(3.0, 8.0)
            candidates = dominant.centre + directions * reach
            depth = _liver_depth(plan, candidates)
            centre = candidates[int(np.argmax(depth))]
            lesions.append(_new_lesion(rng, plan, (ds, d1s, d2s), (1.0, viable_fraction(0.5), viable_fraction(0.8)),
                                       "satellite", irregular * 0.5, centre=centre))
    # new lesions in poor-prognosis patients (intrahepatic progression)
    n_new_t1 = int(rng.poisson(NEW_LESION_RATE[0] * max(g - NEW_LESION_FROM_G, 0.0)))
    n_new_t2 = int(rng.poisson(NEW_LESION_RATE[1] * max(g - NEW_LESION_FROM_G + 0.2, 0.0)))
    for t_first, count in ((1, n_new_t1), (2, n_new_t2)):
        for _ in range(count):
            d = rng.uniform(15.0, 24.0)
            diam = (0.0, d, grow(d, d)) if t_first == 1 else (0.0, 0.0, d)
            lesions.append(_new_lesion(rng, plan, diam, (0.0, 1.0, 1.0), "new", irregular, placed=lesions))
    plan.lesions = lesions


def _best_mrecist(lesions: list[Lesion]) -> tuple[str, list[float]]:
    """Best overall response by mRECIST from the plan's viable diameters.

    Targets: up to two nodules measurable at baseline; new lesions count when measurable.
    "Measurable" is mRECIST's 10 mm *as imaged* (nominal x IMAGED_MM_PER_NOMINAL_MM), so that this
    column agrees with ``analysis.mrecist`` run on the labels of an S >= 128 cohort. Per follow-up
    classification and best response are analysis.mrecist's.
    """
    from analysis.mrecist import best_response, classify_response

    measurable = MEASURABLE_MM / IMAGED_MM_PER_NOMINAL_MM
    targets = sorted((les for les in lesions if les.kind == "nodule" and les.diameter[0] >= measurable),
                     key=lambda les: -les.diameter[0])[:2]
    sums = [sum(les.viable_diameter(t) for les in targets) for t in range(3)]
    if not targets or sums[0] <= 0:
        return "NA", sums
    responses, nadir = [], sums[0]
    for t in (1, 2):
        new = any(les.kind == "new" and les.diameter[t] >= measurable and les.viable[t] > 0 for les in lesions)
        responses.append(classify_response(sums[0], nadir, sums[t], new_lesion=new))
        nadir = min(nadir, sums[t])
    return best_response(responses), sums


def _plans(n_patients: int, seed: int) -> list[PatientPlan]:
    return [_plan_patient(i, ss) for i, (ss, _) in enumerate(_patient_seeds(n_patients, seed))]


def _table(plans: list[PatientPlan]) -> pd.DataFrame:
    frame = pd.DataFrame([{**p.clinical, **p.latent} for p in plans])
    frame["risk_class"] = derive_risk_class(frame)
    latent_cols = [c for c in frame.columns if c.startswith("latent_")]
    return frame[list(CLINICAL_COLUMNS) + latent_cols]


def make_clinical(n_patients: int, seed: int) -> pd.DataFrame:
    """The clinical table of a synthetic cohort, without images.

    Contract columns (docs/contracts.md) followed by ``latent_*`` columns (the generator's truth:
    latent prognosis, tumour volumes and viable diameters per time point) that ``clinical.csv``
    does not carry. Identical to what :func:`make_cohort` writes for the same ``seed``.
    """
    check_args(n_patients, 32, seed)
    return _table(_plans(n_patients, seed))


# ===================================================================================== images
def _real_scale(shape: int, n_slices: int) -> np.ndarray:
    """real body-frame mm -> world mm (see module docstring)."""
    sx = 0.552 * shape / 165.0
    sz = 0.6 * (n_slices * SLICE_THICKNESS_MM / 2.0) / 80.0
    return np.array([sx, sx, sz])


def n_slices_for(shape: int) -> int:
    return max(8, round(0.4 * shape))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad([rng.normal(0, 1.0), rng.normal(0, 1.0), rng.normal(0, 2.5)])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _fourier_field(r: np.ndarray, freqs: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Smooth field in about [-1, 1] at points r (..., 3)."""
    out = np.zeros(r.shape[:-1], np.float32)
    for f, p in zip(freqs, phases):
        out += np.cos(r @ f.astype(np.float32) + np.float32(p))
    return out * np.float32(math.sqrt(2.0 / len(phases)))


def _segment_distance(r: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = (b - a).astype(np.float32)
    t = np.clip(((r - a.astype(np.float32)) @ ab) / np.float32(ab @ ab), 0.0, 1.0)
    closest = a.astype(np.float32) + t[..., None] * ab
    return np.linalg.norm(r - closest, axis=-1)


def lesion_gain(shape: int) -> float:
    """How much larger than the (scaled) anatomy lesions are drawn, so that they appear at
    IMAGED_MM_PER_NOMINAL_MM of their nominal size in image mm (x1.63 at S = 128); capped at
    MAX_LESION_GAIN so small matrices keep some liver (S = 64: lesions at 0.54x nominal mm)."""
    sx = _real_scale(shape, n_slices_for(shape))[0]
    return float(np.clip(IMAGED_MM_PER_NOMINAL_MM / sx, 1.0, MAX_LESION_GAIN))


def burden_gain_limit(plan: PatientPlan) -> float:
    """The largest lesion gain at which no time point's tumour (its lesions as spheres of the
    planned diameters) exceeds MAX_TUMOUR_BURDEN of the liver (its lobes as ellipsoids).

    One gain per patient for all time points, so growth and response ratios stay as planned;
    without it a 64 matrix (gain 2.5) draws the largest lesions bigger than the whole liver.
    """
    liver_mm3 = sum(4.0 / 3.0 * math.pi * float(np.prod(radii)) for _, radii in plan.liver_lobes)
    tumour_mm3 = max(sum(math.pi / 6.0 * les.diameter[t] ** 3 for les in plan.lesions) for t in range(len(TIMEPOINTS)))
    if tumour_mm3 <= 0:
        return math.inf
    return (MAX_TUMOUR_BURDEN * liver_mm3 / tumour_mm3) ** (1.0 / 3.0)


def _index_box(inv: np.ndarray, centre, half, dims):
    """Voxel-index slices of the box ``centre +/- half`` (real frame), or None when off the grid."""
    centre_ijk = inv[:3, :3] @ np.asarray(centre, float) + inv[:3, 3]
    reach = np.abs(inv[:3, :3]) @ np.asarray(half, float)
    lo = np.clip(np.floor(centre_ijk - reach).astype(int), 0, dims)
    hi = np.clip(np.ceil(centre_ijk + reach).astype(int) + 1, 0, dims)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _render(plan: PatientPlan, t: int, dims, to_real: np.ndarray, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clean intensity and label of a grid ``dims`` for time point t.

    ``to_real`` (4 x 4) maps voxel indices to the real body frame; lesions are evaluated only in
    their bounding boxes and vessels only inside the liver, which keeps S = 128 at ~1 s a scan.
    """
    dims = tuple(int(n) for n in dims)
    m3, off = to_real[:3, :3].astype(np.float32), to_real[:3, 3].astype(np.float32)
    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in dims), indexing="ij"), -1)
    r = ijk @ m3.T + off
    del ijk
    x, y = r[..., 0], r[..., 1]
    intensity = np.full(dims, INT_AIR, np.float32)
    label = np.zeros(dims, np.uint8)
    body_rho = np.sqrt((x / BODY_HALF_AXES_MM[0]) ** 2 + ((y + 10.0) / BODY_HALF_AXES_MM[1]) ** 2)
    intensity[body_rho <= 1.0] = INT_FAT
    inner = body_rho <= 1.0 - plan.fat_mm / BODY_HALF_AXES_MM[1]
    intensity[inner] = INT_TISSUE
    spleen = ((x + 105.0) / 38.0) ** 2 + ((y + 35.0) / 50.0) ** 2 + (r[..., 2] / 60.0) ** 2 <= 1.0
    intensity[spleen & inner] = INT_SPLEEN
    intensity[((x + 15.0) ** 2 + (y + 55.0) ** 2 <= 12.0**2) & inner] = INT_AORTA
    intensity[(x**2 + (y + 92.0) ** 2 <= 22.0**2) & inner] = INT_SPINE

    # liver: union of ellipsoids in a smoothly warped frame (lobulated outline), evaluated in its
    # bounding box only
    inv = np.linalg.inv(to_real)
    freqs, phases, amps = plan.liver_warp
    lo_real = np.min([c - rad for c, rad in plan.liver_lobes], axis=0) - amps.max()
    hi_real = np.max([c + rad for c, rad in plan.liver_lobes], axis=0) + amps.max()
    box = _index_box(inv, (lo_real + hi_real) / 2, (hi_real - lo_real) / 2, dims)
    liver = np.zeros(dims, bool)
    if box is not None:
        rb = r[box]
        warped = rb.copy()
        for axis in range(3):
            warped[..., axis] += np.float32(amps[axis]) * np.cos(rb @ freqs[axis].astype(np.float32) + np.float32(phases[axis]))
        sub = np.zeros(rb.shape[:-1], bool)
        for centre, radii in plan.liver_lobes:
            sub |= (((warped - centre.astype(np.float32)) / radii.astype(np.float32)) ** 2).sum(-1) <= 1.0
        liver[box] = sub
    liver &= inner
    liver_idx = np.flatnonzero(liver)
    r_flat = r.reshape(-1, 3)
    r_liver = r_flat[liver_idx]
    intensity.flat[liver_idx] = INT_LIVER * (1.0 + 0.04 * _fourier_field(r_liver, *plan.texture))
    label.flat[liver_idx] = 1
    for a, b, radius in plan.vessels:
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
        near = np.flatnonzero(np.all((r_liver >= lo.astype(np.float32)) & (r_liver <= hi.astype(np.float32)), axis=1))
        if near.size:
            hit = _segment_distance(r_liver[near], a, b) <= radius
            intensity.flat[liver_idx[near[hit]]] = INT_VESSEL

    for les in plan.lesions:
        d = les.diameter[t]
        if d <= 0:
            continue
        radius = d * gain / 2.0
        reach = radius * (1.0 + les.irregularity) + 1.0
        # peritumoral arterial enhancement (a high-risk sign) reaches a little further
        halo = PERITUMORAL_MM * gain if plan.peritumoral else 0.0
        box = _index_box(inv, les.centre, np.full(3, reach + halo), dims)
        if box is None:
            continue
        rel = r[box] - les.centre.astype(np.float32)
        sub_inner = inner[box]
        dist = np.linalg.norm(rel, axis=-1)
        unit = rel / np.maximum(dist, 1e-6)[..., None]
        bound = radius * (1.0 + les.irregularity * _fourier_field(unit, les.shape_freqs, les.shape_phases) / 2.0)
        inside = (dist <= bound) & sub_inner
        if not inside.any():
            # a lesion smaller than a voxel still marks the voxel nearest its centre
            nearest = np.unravel_index(np.argmin(dist), dist.shape)
            if sub_inner[nearest]:
                inside[nearest] = True
        sub_int, sub_lab = intensity[box], label[box]
        if halo > 0:
            ring = (dist > bound) & (dist <= bound + halo) & (sub_lab == 1)
            sub_int[ring] = np.maximum(sub_int[ring], INT_PERITUMORAL)
        viable_radius = radius * les.viable[t] ** (1.0 / 3.0)
        viable_centre = les.normal.astype(np.float32) * np.float32(radius - viable_radius)
        necrotic = np.linalg.norm(rel - viable_centre, axis=-1) > viable_radius
        texture = _fourier_field(r[box][inside], *plan.texture)
        viable = INT_VIABLE * np.clip(1.0 + plan.heterogeneity * 1.2 * texture, 0.7, 1.5)
        sub_int[inside] = np.where(necrotic[inside], np.float32(INT_NECROTIC), viable).astype(np.float32)
        sub_lab[inside] = 2
    return intensity, label


def _scan(plan: PatientPlan, t: int, shape: int, rng: np.random.Generator, orientation: str, centre_world: np.ndarray):
    """One scan: stored array (int16 or float32), label (uint8) and affine, in ``orientation``."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    nz = n_slices_for(shape)
    spacing = rng.uniform(*SPACING_RANGE_MM)
    zooms = np.array([spacing, spacing, SLICE_THICKNESS_MM])
    dims = np.array([shape, shape, nz])
    rot = _rotation(rng)
    offset = np.array([rng.normal(0, 6.0), rng.normal(0, 6.0), rng.normal(0, 5.0)])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    affine[:3, 3] = centre_world + offset - affine[:3, :3] @ ((dims - 1) / 2.0)

    to_real = np.diag(np.append(1.0 / _real_scale(shape, nz), 1.0)) @ affine
    to_real[:3, 3] -= centre_world / _real_scale(shape, nz)
    clean, label = _render(plan, t, dims, to_real, min(lesion_gain(shape), burden_gain_limit(plan)))

    # partial volume in-plane, then bias field, Rician noise, scanner scale
    clean = ndimage.gaussian_filter(clean, sigma=(0.6, 0.6, 0.3))
    u = np.ogrid[-1:1:dims[0] * 1j, -1:1:dims[1] * 1j, -1:1:dims[2] * 1j]
    u = [a.astype(np.float32) for a in u]
    c = rng.normal(0, 0.12, 6).astype(np.float32)
    bias = np.exp(c[0] * u[0] + c[1] * u[1] + c[2] * u[2] + c[3] * u[0] ** 2 + c[4] * u[1] ** 2 + c[5] * u[0] * u[1])
    sigma = rng.uniform(0.015, 0.035)
    signal = clean * bias
    noisy = np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)
    if rng.random() < 0.2:
        dtype = np.float32
        data = (noisy * rng.uniform(0.5, 4.0) + rng.uniform(0, 0.1)).astype(np.float32)
    else:
        dtype = np.int16
        data = np.clip(np.round(noisy * rng.uniform(600, 1800) + rng.uniform(0, 60)), 0, 32767).astype(np.int16)

    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(orientation)))
    stored_affine = affine @ inv_ornt_aff(transform, tuple(dims))
    return (apply_orientation(data, transform).astype(dtype), apply_orientation(label, transform).astype(np.uint8),
            stored_affine, dtype)


def _write_patient(plan: PatientPlan, scan_ss: np.random.SeedSequence, shape: int, out: Path) -> None:
    rng = np.random.default_rng(scan_ss)
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    centre_world = rng.normal(0, 20.0, 3)  # table position
    for t, tp in enumerate(TIMEPOINTS):
        data, label, affine, dtype = _scan(plan, t, shape, rng, orientation, centre_world)
        save_nifti(out / "images" / plan.patient_id / f"{tp}.nii.gz", data, affine, dtype=dtype)
        save_nifti(out / "labels" / plan.patient_id / f"{tp}.nii.gz", label, affine, dtype=np.uint8)


def check_args(n_patients, shape, seed, names=("n_patients", "shape", "seed")) -> None:
    """ValueError naming the argument (``names``) unless n_patients >= 1, shape >= 16 and seed >= 0 are integers."""
    def whole(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(n_patients) or n_patients < 1:
        raise ValueError(f"{names[0]}: found {n_patients!r}, expected an integer >= 1")
    if not whole(shape) or shape < 16:
        raise ValueError(f"{names[1]}: found {shape!r}, expected an integer >= 16 (in-plane matrix size)")
    if not whole(seed) or seed < 0:
        raise ValueError(f"{names[2]}: found {seed!r}, expected an integer >= 0")


def _generator_of(path: Path) -> str | None:
    import json

    try:
        return json.loads(path.read_text()).get("generator") if path.exists() else None
    except (OSError, ValueError, AttributeError):
        return None


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder holding something else than an earlier synthetic cohort
    (complete, or left incomplete by an interrupted run: its INCOMPLETE_MARKER says so)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; expected a new or empty folder")
    entries = list(out.iterdir())
    if not entries:
        return
    interrupted = _generator_of(out / INCOMPLETE_MARKER) == GENERATOR
    if interrupted:
        log.warning("%s: an interrupted synth left this folder incomplete (%s found); starting over",
                    out, INCOMPLETE_MARKER)
    elif _generator_of(out / "cohort.json") != GENERATOR:
        raise FileExistsError(f"{out}: folder is not empty and holds no synthetic cohort (cohort.json with "
                              f"generator {GENERATOR!r}); expected a new or empty folder")
    # an earlier synthetic cohort: drop it so no stale patient stays behind
    for name in ("images", "labels"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("clinical.csv", "cohort.json", INCOMPLETE_MARKER):
        if (out / name).exists():
            (out / name).unlink()


def make_cohort(out_dir, n_patients: int = 181, shape: int = 128, seed: int = 0, progress: bool = True) -> Path:
    """Write a synthetic cohort folder (docs/contracts.md) and return its path.

    ``shape`` is the in-plane matrix S (S x S, ``max(8, round(0.4 S))`` slices of 5 mm).
    clinical.csv and cohort.json are written last, so a cohort folder with a cohort.json is complete.
    """
    check_args(n_patients, shape, seed)
    out = Path(out_dir)
    _prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    # written before any scan and removed after cohort.json: a folder holding it was left by an
    # interrupted run, which the next run into the same folder replaces
    write_json(out / INCOMPLETE_MARKER, {"generator": GENERATOR, "seed": int(seed), "n_patients": int(n_patients),
                                         "shape": int(shape)})
    seeds = _patient_seeds(n_patients, seed)
    plans = [_plan_patient(i, plan_ss) for i, (plan_ss, _) in enumerate(seeds)]
    from tqdm.auto import tqdm

    for plan, (_, scan_ss) in tqdm(list(zip(plans, seeds)), desc="synthetic patients", unit="patient",
                                   disable=not progress):
        _write_patient(plan, scan_ss, int(shape), out)
    table = _table(plans)
    write_csv(out / "clinical.csv", table[list(CLINICAL_COLUMNS)])
    write_json(out / "cohort.json", {"synthetic": True, "generator": GENERATOR, "seed": int(seed),
                                     "n_patients": int(n_patients), "shape": int(shape), "version": VERSION})
    (out / INCOMPLETE_MARKER).unlink()
    log.info("wrote synthetic cohort of %d patients (shape %d, seed %d) to %s", n_patients, shape, seed, out)
    return out


def synth_cli(out, patients: int = 181, shape: int = 128, seed: int = 0) -> str:
    """Write a synthetic HCC cohort: ``python -m analysis synth --out DIR --patients N --shape S --seed K``.

    The cohort folder of docs/contracts.md (images/, labels/, clinical.csv, cohort.json); how the
    patients, anatomy and scans are drawn is in the docstring of analysis.synthetic.

    Args:
        out: the cohort folder to write; it must be new, empty or an earlier synthetic cohort (replaced), complete
            or left incomplete by an interrupted synth (started over, with a warning).
        patients: number of patients, an integer >= 1 (181 is the paper's cohort size).
        shape: in-plane matrix size S, an integer >= 16 (S x S voxels, max(8, round(0.4 S)) slices of 5 mm);
            a small S shows a proportionally smaller abdomen.
        seed: generator seed, an integer >= 0; with one seed, patient i is the same whatever --patients.
    """
    try:
        check_args(patients, shape, seed, names=("--patients", "--shape", "--seed"))
        path = make_cohort(out, n_patients=patients, shape=shape, seed=seed, progress=True)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"analysis synth: {exc}") from None
    return f"synthetic cohort: {patients} patients, shape {shape}, seed {seed} -> {path}"
