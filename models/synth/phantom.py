"""One synthetic acute-stroke diffusion study with its ground truth, in memory.

:func:`generate_phantom` draws everything from one seed: head pose, scan grid,
tissue parameters, lesions, bias field and noise.  Each DWI voxel is the mean
of sub-samples (in-plane to ~1 mm, through-plane 4 over the slice thickness,
not the gap), so partial volume, slice gaps and oblique slices behave like a
real 2-D EPI acquisition.  Sampling uses :func:`scipy.ndimage.affine_transform`
(trilinear) per slice, restricted to the head's footprint on that slice, which
keeps a case around a second on one core.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import generate_uid
from scipy import ndimage as ndi

from models.synth import mimics as mim
from models.synth.anatomy import Anatomy, load_anatomy
from models.synth.diffusion import (
    ADC_UNIT,
    B_VALUE,
    TissueParameters,
    at_echo_time,
    bias_field,
    kspace_transfer,
    random_tissue_parameters,
    rician,
    rician_acquired,
    scanner_adc,
    shine_through_at_echo_time,
)
from models.synth.domains import ScannerDomain, ScannerSettings, get_domain
from models.synth.geometry import Pose, ScanGeometry, random_pose, random_scan_geometry
from models.synth.lesions import (
    LesionClass,
    LesionField,
    LesionSpec,
    choose_lesion_class,
    plan_lesions,
    rasterise_lesions,
)

logger = logging.getLogger(__name__)

#: Bumped whenever the same seed would give a different study.  1.1: lesion
#: mimics (:mod:`models.synth.mimics`), on by default; ``mimics=False`` gives 1.0's studies.
GENERATOR_VERSION = "1.1"
#: Through-plane sub-samples per slice (over the slice thickness).
THROUGH_PLANE_SAMPLES = 4
#: DWI stored values use 12 bits, as most scanners do.
DWI_MAX_STORED = 4095

_MODELS: dict[str, dict[float, str]] = {
    "SIEMENS": {1.5: "Aera", 3.0: "Skyra"},
    "GE MEDICAL SYSTEMS": {1.5: "Optima MR450w", 3.0: "SIGNA Premier"},
    "Philips Medical Systems": {1.5: "Ingenia", 3.0: "Ingenia Elition X"},
    "Canon_MEC": {1.5: "Vantage Orian", 3.0: "Vantage Galan 3T"},
}


@dataclass(frozen=True, slots=True)
class Acquisition:
    """Scanner and sequence parameters written to the DICOM headers."""

    manufacturer: str
    model_name: str
    field_strength_t: float
    echo_time_ms: float
    repetition_time_ms: float
    echo_train_length: int
    pixel_bandwidth_hz: float
    number_of_averages: float
    descending_slices: bool  # instance numbers head -> feet instead of feet -> head


@dataclass(frozen=True, slots=True)
class StudyIdentity:
    """UIDs and (synthetic) patient/study identifiers, all derived from the seed."""

    study_instance_uid: str
    frame_of_reference_uid: str
    dwi_series_instance_uid: str
    adc_series_instance_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str


@dataclass(frozen=True, slots=True, eq=False)
class PhantomStudy:
    """A synthetic study and its truth, all on the DWI grid (slices, rows, columns).

    ``b0``/``dwi`` are the stored uint16 values of the b=0 and b=1000 images;
    ``adc`` the stored uint16 ADC in units of 1e-6 mm2/s; ``fractions`` the
    per-voxel lesion fraction (0..1) and ``mask = fractions >= 0.5``.
    Slice ``k`` is at ``geometry.position(k)`` (ascending along the slice
    normal).  ``tissue_fractions`` (gm, wm, csf; channel first) is only filled
    when asked for, for tests.
    """

    seed: int
    lesion_class: LesionClass
    lesions: tuple[LesionSpec, ...]
    geometry: ScanGeometry
    pose: Pose
    acquisition: Acquisition
    identity: StudyIdentity
    tissue_parameters: TissueParameters
    noise_sigma: float  # in stored DWI units
    b0: npt.NDArray[np.uint16]
    dwi: npt.NDArray[np.uint16]
    adc: npt.NDArray[np.uint16]
    fractions: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    b_value: float = B_VALUE
    tissue_fractions: npt.NDArray[np.float32] | None = field(default=None)
    domain: str | None = None  # scanner domain name (models.synth.domains), None = mixed
    scanner: ScannerSettings | None = None  # what was drawn from that domain
    mimics: tuple[str, ...] = ()  # lesion mimics in the images (models.synth.mimics)
    mimic_parameters: dict[str, Any] | None = None  # what was drawn for each of them

    @property
    def lesion_volume_ml(self) -> float:
        """Volume of the truth mask (voxel count x voxel volume)."""
        return float(self.mask.sum()) * self.geometry.voxel_volume_ml

    @property
    def lesion_volume_continuous_ml(self) -> float:
        """Partial-volume lesion volume (sum of fractions x voxel volume)."""
        return float(self.fractions.sum(dtype=np.float64)) * self.geometry.voxel_volume_ml


def _uid(seed: int, what: str) -> str:
    return str(generate_uid(entropy_srcs=["strokeseg-phantom", str(seed), what]))


def _identity(
    rng: np.random.Generator, seed: int, patient_name: str | None, uid_salt: str = ""
) -> StudyIdentity:
    """Identifiers of the phantom; ``uid_salt`` (a domain) keeps paired studies' UIDs apart."""
    day = np.datetime64("2024-01-01") + np.timedelta64(int(rng.integers(0, 730)), "D")
    age_days = int(rng.integers(40 * 365, 92 * 365))
    birth = day - np.timedelta64(age_days, "D")
    seconds = int(rng.integers(0, 86400))
    return StudyIdentity(
        study_instance_uid=_uid(seed, uid_salt + "study"),
        frame_of_reference_uid=_uid(seed, uid_salt + "frame-of-reference"),
        dwi_series_instance_uid=_uid(seed, uid_salt + "series-dwi"),
        adc_series_instance_uid=_uid(seed, uid_salt + "series-adc"),
        patient_name=patient_name or f"PHANTOM^CASE{seed % 10000:04d}",
        patient_id=f"PH{seed:08d}"[-16:],
        patient_birth_date=str(birth).replace("-", ""),
        patient_sex=str(rng.choice(["F", "M"])),
        study_date=str(day).replace("-", ""),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        accession_number=f"A{seed % 10**9:09d}",
        study_id=str(seed % 10**6),
    )


def _acquisition(rng: np.random.Generator, manufacturer: str) -> Acquisition:
    field_strength = float(rng.choice([1.5, 3.0]))
    models = _MODELS.get(manufacturer, {1.5: "Phantom 1.5T", 3.0: "Phantom 3T"})
    return Acquisition(
        manufacturer=manufacturer,
        model_name=models[field_strength],
        field_strength_t=field_strength,
        echo_time_ms=float(round(rng.uniform(60.0, 100.0), 1)),
        repetition_time_ms=float(round(rng.uniform(3000.0, 8000.0), 0)),
        echo_train_length=int(rng.choice([1, 64, 80, 96])),
        pixel_bandwidth_hz=float(round(rng.uniform(900.0, 1500.0), 0)),
        number_of_averages=float(rng.choice([1.0, 2.0, 3.0])),
        descending_slices=bool(rng.random() < 0.5),
    )


def _domain_acquisition(
    rng: np.random.Generator, domain: ScannerDomain, scanner: ScannerSettings
) -> Acquisition:
    """Header values of a domain case: sequence timing from the drawn settings."""
    field_strength = scanner.field_strength_t
    models = _MODELS.get(domain.manufacturer, {1.5: "Phantom 1.5T", 3.0: "Phantom 3T"})
    return Acquisition(
        manufacturer=domain.manufacturer,
        model_name=models[field_strength],
        field_strength_t=field_strength,
        echo_time_ms=scanner.echo_time_ms,
        repetition_time_ms=scanner.repetition_time_ms,
        echo_train_length=scanner.acquired_matrix // 2,  # single-shot EPI, parallel factor 2
        pixel_bandwidth_hz=float(round(rng.uniform(900.0, 1500.0), 0)),
        number_of_averages=scanner.number_of_averages,
        descending_slices=bool(rng.random() < 0.5),
    )


class _Sampler:
    """Averages trilinear samples of lattice maps over each DWI voxel."""

    def __init__(
        self,
        anatomy: Anatomy,
        pose: Pose,
        geometry: ScanGeometry,
    ) -> None:
        self.geometry = geometry
        ps_row, ps_col = geometry.pixel_spacing
        # In-plane sub-samples: enough to reach ~1 mm (the anatomy's resolution).
        self.n_inplane = max(1, round(max(ps_row, ps_col) / 1.1))
        self.n_through = THROUGH_PLANE_SAMPLES
        lattice_from_patient = np.linalg.inv(anatomy.index_to_ras) @ np.linalg.inv(pose.matrix())
        self._lattice_from_index = lattice_from_patient @ geometry.index_to_patient()
        self._bboxes = self._slice_bboxes(anatomy.head_points_ras[::3], pose)

    def _slice_bboxes(
        self, points_ras: npt.NDArray[np.float64], pose: Pose
    ) -> list[tuple[int, int, int, int] | None]:
        """Per slice, the (r0, r1, c0, c1) pixel box of the head, or None."""
        g = self.geometry
        m = pose.matrix()
        patient = points_ras @ m[:3, :3].T + m[:3, 3]
        index = (patient - np.asarray(g.origin)) @ np.linalg.inv(g.index_to_patient()[:3, :3]).T
        half = (g.slice_thickness / 2.0 + 1.5) / g.slice_spacing
        boxes: list[tuple[int, int, int, int] | None] = []
        n_slices, rows, cols = g.shape
        for k in range(n_slices):
            sel = np.abs(index[:, 0] - k) <= half
            if not sel.any():
                boxes.append(None)
                continue
            r = index[sel, 1]
            c = index[sel, 2]
            r0 = int(np.clip(math.floor(r.min()) - 2, 0, rows))
            r1 = int(np.clip(math.ceil(r.max()) + 3, 0, rows))
            c0 = int(np.clip(math.floor(c.min()) - 2, 0, cols))
            c1 = int(np.clip(math.ceil(c.max()) + 3, 0, cols))
            boxes.append((r0, r1, c0, c1) if r1 > r0 and c1 > c0 else None)
        return boxes

    def _matrix(self, j: int, k: int, r0: int, c0: int, lattice_offset: npt.NDArray[np.float64],
                n_through: int) -> npt.NDArray[np.float64]:
        """Homogeneous map from sub-sample output index (0, R, C) to lattice index."""
        g = self.geometry
        n = self.n_inplane
        through = ((j + 0.5) / n_through - 0.5) * g.slice_thickness / g.slice_spacing
        sub = np.eye(4)
        sub[1, 1] = sub[2, 2] = 1.0 / n
        sub[0, 3] = k + through
        sub[1, 3] = r0 + 0.5 / n - 0.5
        sub[2, 3] = c0 + 0.5 / n - 0.5
        m = self._lattice_from_index @ sub
        m[:3, 3] -= lattice_offset
        return m

    def sample(
        self,
        maps: list[npt.NDArray[np.float32]],
        *,
        lattice_offset: tuple[int, int, int] = (0, 0, 0),
        region: tuple[int, int, int, int, int, int] | None = None,
        through_samples: int | None = None,
    ) -> list[npt.NDArray[np.float32]]:
        """Voxel means of ``maps`` (which start at ``lattice_offset`` of the lattice).

        ``region`` = (k0, k1, r0, r1, c0, c1) limits the work further (lesion boxes);
        ``through_samples`` (default :data:`THROUGH_PLANE_SAMPLES`) trades
        through-plane accuracy for speed on smooth maps.
        """
        n_through = self.n_through if through_samples is None else int(through_samples)
        g = self.geometry
        out = [np.zeros(g.shape, dtype=np.float32) for _ in maps]
        offset = np.asarray(lattice_offset, dtype=np.float64)
        n = self.n_inplane
        for k in range(g.shape[0]):
            box = self._bboxes[k]
            if box is None:
                continue
            r0, r1, c0, c1 = box
            if region is not None:
                if not region[0] <= k < region[1]:
                    continue
                r0, r1 = max(r0, region[2]), min(r1, region[3])
                c0, c1 = max(c0, region[4]), min(c1, region[5])
                if r1 <= r0 or c1 <= c0:
                    continue
            shape = (1, (r1 - r0) * n, (c1 - c0) * n)
            for j in range(n_through):
                m = self._matrix(j, k, r0, c0, offset, n_through)
                for src, dst in zip(maps, out, strict=True):
                    sampled = ndi.affine_transform(
                        src, m, output_shape=shape, order=1, mode="constant", cval=0.0,
                        output=np.float32, prefilter=False,
                    )
                    block = sampled.reshape(r1 - r0, n, c1 - c0, n).mean(axis=(1, 3))
                    dst[k, r0:r1, c0:c1] += block
        scale = np.float32(1.0 / n_through)
        for dst in out:
            dst *= scale
        return out

    def region_of_lattice_box(
        self, box: tuple[slice, slice, slice]
    ) -> tuple[int, int, int, int, int, int] | None:
        """DWI index box (k0, k1, r0, r1, c0, c1) covering a lattice box, or None."""
        corners = np.array(
            [[i, j, k] for i in (box[0].start, box[0].stop)
             for j in (box[1].start, box[1].stop) for k in (box[2].start, box[2].stop)],
            dtype=np.float64,
        )
        index_from_lattice = np.linalg.inv(self._lattice_from_index)
        idx = corners @ index_from_lattice[:3, :3].T + index_from_lattice[:3, 3]
        lo = np.floor(idx.min(axis=0)).astype(int) - 1
        hi = np.ceil(idx.max(axis=0)).astype(int) + 2
        shape = np.array(self.geometry.shape)
        lo = np.clip(lo, 0, shape)
        hi = np.clip(hi, 0, shape)
        if np.any(hi <= lo):
            return None
        return (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))


def _signal_maps(
    anatomy: Anatomy,
    params: TissueParameters,
    lesions: LesionField | None,
    b_value: float = B_VALUE,
    *,
    atrophy: npt.NDArray[np.float32] | None = None,
    replacements: tuple[LesionField, ...] = (),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """S0 and S(b) on the lattice, and the lesion fraction inside the lesion box.

    ``b_value`` is the *effective* b of the acquisition (a domain's gradient
    calibration may differ from the nominal 1000 written to the headers).
    ``atrophy`` (mimic ``csf_partial_volume``; modified in place) is the
    fraction of parenchyma turned into CSF outside the acute lesions;
    ``replacements`` (mimics ``t2_shine_through``, ``chronic_infarct``) replace
    parenchyma like lesions do, but leave the lesion fraction alone.
    """
    flat = anatomy.tissues.reshape(-1, anatomy.tissues.shape[-1])
    s0 = (flat @ params.signal_weights(0.0)).reshape(anatomy.shape)
    sb = (flat @ params.signal_weights(b_value)).reshape(anatomy.shape)
    if atrophy is not None or replacements:
        _apply_mimic_tissue(anatomy, params, lesions, b_value, s0, sb, atrophy, replacements)
    if lesions is None:
        return s0, sb, None
    box = lesions.box
    gm = anatomy.tissues[box + (0,)]
    wm = anatomy.tissues[box + (1,)]
    w0 = params.signal_weights(0.0)
    wb = params.signal_weights(b_value)
    par_s0 = gm * w0[0] + wm * w0[1]
    par_sb = gm * wb[0] + wm * wb[1]
    occ = lesions.occupancy
    s0[box] += occ * lesions.s0_increase * par_s0
    lesion_sb = (1.0 + lesions.s0_increase) * par_s0 * np.exp(-b_value * lesions.adc)
    sb[box] += occ * (lesion_sb - par_sb)
    fraction = np.ascontiguousarray(occ * anatomy.parenchyma[box], dtype=np.float32)
    return s0, sb, fraction


def _apply_mimic_tissue(
    anatomy: Anatomy,
    params: TissueParameters,
    lesions: LesionField | None,
    b_value: float,
    s0: npt.NDArray[np.float32],
    sb: npt.NDArray[np.float32],
    atrophy: npt.NDArray[np.float32] | None,
    replacements: tuple[LesionField, ...],
) -> None:
    """Tissue-level mimics on the lattice maps ``s0``/``sb`` (in place)."""
    w0 = params.signal_weights(0.0)
    wb = params.signal_weights(b_value)
    gm = anatomy.tissues[..., 0]
    wm = anatomy.tissues[..., 1]
    if atrophy is not None:
        if lesions is not None:  # acute lesions keep their parenchyma (truth unchanged)
            atrophy[lesions.box] *= 1.0 - lesions.occupancy
        # Parenchyma fraction ``atrophy`` of each voxel becomes CSF.
        s0 += atrophy * (gm * (w0[2] - w0[0]) + wm * (w0[2] - w0[1]))
        sb += atrophy * (gm * (wb[2] - wb[0]) + wm * (wb[2] - wb[1]))
    for repl in replacements:
        box = repl.box
        keep = 1.0 if atrophy is None else 1.0 - atrophy[box]
        gm_box = gm[box] * keep
        wm_box = wm[box] * keep
        par_s0 = gm_box * w0[0] + wm_box * w0[1]
        par_sb = gm_box * wb[0] + wm_box * wb[1]
        occ = repl.occupancy
        s0[box] += occ * repl.s0_increase * par_s0
        new_sb = (1.0 + repl.s0_increase) * par_s0 * np.exp(-b_value * repl.adc)
        sb[box] += occ * (new_sb - par_sb)


def _seed_sequence(seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), 0x57_0E_5E_6])


def lesion_plan(
    seed: int, *, lesion_class: LesionClass | str | None = None
) -> tuple[LesionClass, tuple[LesionSpec, ...]]:
    """The size class and lesions :func:`generate_phantom` draws for ``seed``, without imaging.

    Lesions do not depend on the scanner domain, so this is the cheap way to
    check a dataset's lesion mix (milliseconds per case instead of seconds).
    """
    forced_class = LesionClass(lesion_class) if lesion_class is not None else None
    rng_lesion = np.random.default_rng(_seed_sequence(seed).spawn(5)[1])
    cls = forced_class if forced_class is not None else choose_lesion_class(rng_lesion)
    return cls, tuple(plan_lesions(rng_lesion, cls, load_anatomy()))


def _tissue_mimics(
    plan: mim.MimicPlan, anatomy: Anatomy, lesion_field: LesionField | None, pose: Pose
) -> tuple[npt.NDArray[np.float32] | None, tuple[LesionField, ...]]:
    """Atrophy map and parenchyma replacements (shine-through, chronic infarcts) drawn."""
    atrophy = None
    if plan.on("csf_partial_volume"):
        atrophy, record = mim.atrophy_map(plan.rngs["csf_partial_volume"], anatomy)
        plan.parameters["csf_partial_volume"] = record
    replacements: list[LesionField] = []
    for name, draw in (("t2_shine_through", mim.shine_through_field),
                       ("chronic_infarct", mim.chronic_infarct_field)):
        if not plan.on(name):
            continue
        repl, record = draw(plan.rngs[name], anatomy, B_VALUE, pose.scale**-3)
        plan.parameters[name] = record
        if repl is not None:
            replacements.append(mim.exclude_lesions(repl, lesion_field))
    return atrophy, tuple(replacements)


def _image_mimics(
    plan: mim.MimicPlan,
    anatomy: Anatomy,
    sampler: _Sampler,
    geometry: ScanGeometry,
    pose: Pose,
    params: TissueParameters,
    b_value: float,
    s0: npt.NDArray[np.float32],
    sb: npt.NDArray[np.float32],
    fractions: npt.NDArray[np.float32],
    tissue_fractions: npt.NDArray[np.float32] | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32],
           npt.NDArray[np.float32] | None]:
    """Eyes, residual scalp fat and EPI distortion on the noise-free DWI-grid signals."""
    if plan.on("eyes"):
        rng = plan.rngs["eyes"]
        frac, record = mim.eye_fraction(rng, geometry, pose)
        if float(frac.max()) < 0.5:  # the slab misses the orbits
            plan.dropped.add("eyes")
        else:
            eye_s0 = float(params.s0[2] * rng.uniform(0.85, 1.05))
            eye_adc = float(rng.uniform(2.8e-3, 3.2e-3))
            s0 = (1.0 - frac) * s0 + frac * np.float32(eye_s0)
            sb = (1.0 - frac) * sb + frac * np.float32(eye_s0 * math.exp(-b_value * eye_adc))
            record.update(s0=eye_s0, adc_mm2_s=eye_adc)
            plan.parameters["eyes"] = record
    if plan.on("scalp_fat"):
        (scalp,) = sampler.sample([np.ascontiguousarray(anatomy.tissues[..., 3])],
                                  through_samples=1)
        fat, fat_adc, record = mim.scalp_fat_image(
            plan.rngs["scalp_fat"], scalp, geometry.shape[1]
        )
        s0 = s0 + fat
        sb = sb + fat * np.float32(math.exp(-b_value * fat_adc))
        plan.parameters["scalp_fat"] = record
    if plan.on("susceptibility"):
        mni = mim.voxel_mni(geometry, pose)
        shift, dephase, record = mim.susceptibility_fields(
            plan.rngs["susceptibility"], geometry, pose, mni
        )
        del mni
        s0 = mim.distort(s0 * dephase, shift)
        sb = mim.distort(sb * dephase, shift)
        # Truth follows the image: partial volumes are pushed the same way.
        support = mim.distort(np.ones_like(s0), shift)
        safe = np.maximum(support, np.float32(1e-3))

        def push(frac: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return np.asarray(np.where(support > 1e-3, mim.distort(frac, shift) / safe, 0.0),
                              dtype=np.float32)

        if fractions.any():
            fractions = np.clip(push(fractions), 0.0, 1.0)
        if tissue_fractions is not None:
            tissue_fractions = np.stack([push(t) for t in tissue_fractions], axis=0)
        plan.parameters["susceptibility"] = record
    return s0, sb, fractions, tissue_fractions


def _ghosts(
    plan: mim.MimicPlan, b0: npt.NDArray[np.float32], dwi: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Nyquist N/2 ghosts (own amplitude per b-value) when drawn; else the images as they are."""
    if not plan.on("nyquist_ghost"):
        return b0, dwi
    rng = plan.rngs["nyquist_ghost"]
    a0 = float(rng.uniform(0.02, 0.08))
    ab = float(np.clip(a0 * rng.uniform(0.6, 1.5), 0.02, 0.08))
    gradient = float(rng.uniform(-0.8, 0.8))
    plan.parameters["nyquist_ghost"] = {"amplitude_b0": a0, "amplitude_b1000": ab,
                                        "readout_gradient": gradient}
    return mim.ghost(b0, a0, gradient), mim.ghost(dwi, ab, gradient)


def generate_phantom(
    seed: int,
    *,
    lesion_class: LesionClass | str | None = None,
    manufacturer: str | None = None,
    matrix: int | None = None,
    patient_name: str | None = None,
    with_tissue_maps: bool = False,
    domain: ScannerDomain | str | None = None,
    mimics: mim.MimicsArg = None,
) -> PhantomStudy:
    """Draw one synthetic acute-stroke DWI/ADC study and its truth from ``seed``.

    The same seed (and arguments) always gives the same study, UIDs included.
    ``lesion_class`` forces a size class (``"none"``, ``"small"``, ``"medium"``,
    ``"large"``); by default it is drawn (30/35/25/10 % small/medium/large/none).
    ``matrix`` forces the in-plane matrix (128, 160, 192 or 256).

    ``domain`` (a :class:`~models.synth.domains.ScannerDomain` or its name,
    "A", "B", "C") images the same head and lesions as that scanner would:
    protocol geometry, SNR, k-space blur, bias field, echo time, effective
    b-value and manufacturer all come from the domain (``manufacturer``, if
    given, must agree; ``matrix``, if given, must be one of its matrices).

    ``mimics`` chooses the lesion mimics (:mod:`models.synth.mimics`): by
    default each is drawn with its :data:`~models.synth.mimics.DEFAULT_MIMIC_PROBABILITIES`;
    ``False`` turns them all off, which (without a domain) gives bit for bit
    the studies of generator 1.0; a list of names forces exactly those on; a
    mapping gives each its probability.  Mimics never change the truth.
    """
    forced_class = LesionClass(lesion_class) if lesion_class is not None else None
    scanner_domain = get_domain(domain) if domain is not None else None
    if scanner_domain is None:
        manufacturer = "SIEMENS" if manufacturer is None else manufacturer
    else:
        if manufacturer is not None and manufacturer != scanner_domain.manufacturer:
            raise ValueError(
                f"domain {scanner_domain.name} is {scanner_domain.manufacturer!r}, "
                f"not {manufacturer!r}"
            )
        if matrix is not None and matrix not in scanner_domain.matrix_choices:
            raise ValueError(
                f"domain {scanner_domain.name} reconstructs {scanner_domain.matrix_choices}, "
                f"not {matrix}"
            )
        manufacturer = scanner_domain.manufacturer
    anatomy = load_anatomy()
    ss = _seed_sequence(seed)
    rng_geo, rng_lesion, rng_signal, rng_noise, rng_meta = (
        np.random.default_rng(s) for s in ss.spawn(5)
    )

    pose = random_pose(rng_geo)
    if scanner_domain is None:
        geometry = random_scan_geometry(rng_geo, pose, anatomy.brain_points_ras, matrix=matrix)
        scanner = None
    else:
        geometry = random_scan_geometry(
            rng_geo, pose, anatomy.brain_points_ras, matrix=matrix,
            **scanner_domain.geometry_choices(),
        )
        # A sixth stream: the first five (head, lesions, tissue) stay those of the seed.
        rng_domain = np.random.default_rng(ss.spawn(1)[0])
        scanner = scanner_domain.draw(rng_domain, reconstructed_matrix=geometry.shape[1])
    cls = forced_class if forced_class is not None else choose_lesion_class(rng_lesion)
    specs = plan_lesions(rng_lesion, cls, anatomy)
    lesion_field = rasterise_lesions(
        rng_lesion, specs, anatomy, mni_per_patient_volume=pose.scale**-3
    )
    params = random_tissue_parameters(rng_signal)
    plan = mim.draw_mimics(seed, mimics)
    if plan.on("cortical_ribbon"):
        params, record = mim.ribbon_parameters(plan.rngs["cortical_ribbon"], params, B_VALUE)
        plan.parameters["cortical_ribbon"] = record
    atrophy, replacements = _tissue_mimics(plan, anatomy, lesion_field, pose)
    if scanner is None:
        s0_map, sb_map, fraction_map = _signal_maps(
            anatomy, params, lesion_field, atrophy=atrophy, replacements=replacements
        )
        b_effective = B_VALUE
    else:
        params = at_echo_time(params, scanner.echo_time_ms, scanner.field_strength_t)
        if lesion_field is not None:
            lesion_field = replace(
                lesion_field,
                s0_increase=shine_through_at_echo_time(
                    lesion_field.s0_increase, scanner.echo_time_ms
                ),
            )
        replacements = tuple(
            replace(r, s0_increase=shine_through_at_echo_time(r.s0_increase,
                                                              scanner.echo_time_ms))
            for r in replacements
        )
        b_effective = B_VALUE * scanner.b_value_scale
        s0_map, sb_map, fraction_map = _signal_maps(
            anatomy, params, lesion_field, b_value=b_effective,
            atrophy=atrophy, replacements=replacements,
        )

    sampler = _Sampler(anatomy, pose, geometry)
    s0, sb = sampler.sample([s0_map, sb_map])
    fractions = np.zeros(geometry.shape, dtype=np.float32)
    if lesion_field is not None and fraction_map is not None:
        region = sampler.region_of_lattice_box(lesion_field.box)
        if region is not None:
            origin = tuple(int(s.start) for s in lesion_field.box)
            (fractions,) = sampler.sample(
                [fraction_map], lattice_offset=origin, region=region  # type: ignore[arg-type]
            )
    np.clip(fractions, 0.0, 1.0, out=fractions)
    tissue_fractions = None
    if with_tissue_maps:
        channels = [np.ascontiguousarray(anatomy.tissues[..., i]) for i in range(3)]
        if atrophy is not None:
            lost = atrophy * (channels[0] + channels[1])
            channels = [channels[0] * (1 - atrophy), channels[1] * (1 - atrophy),
                        channels[2] + lost]
        tissue_fractions = np.stack(sampler.sample(channels), axis=0)
    if plan.drawn:
        s0, sb, fractions, tissue_fractions = _image_mimics(
            plan, anatomy, sampler, geometry, pose, params, b_effective,
            s0, sb, fractions, tissue_fractions,
        )

    # Scanner: bias field (same on both b-values), gain, Rician noise, ADC.
    if scanner is None:
        bias = bias_field(rng_signal, geometry.shape, float(rng_signal.uniform(0.05, 0.2)))
        wm_b0 = params.s0[1]
        gain = float(rng_signal.uniform(350.0, 900.0)) / wm_b0
        sigma = float(rng_signal.uniform(0.02, 0.05)) * wm_b0 * gain
        b0_clean, dwi_clean = _ghosts(plan, s0 * bias * np.float32(gain),
                                      sb * bias * np.float32(gain))
        b0_signal = rician(rng_noise, b0_clean, sigma)
        dwi_signal = rician(rng_noise, dwi_clean, sigma)
    else:
        # sigma is the noise of a stored pixel after the k-space transfer
        # (zero-filling, apodisation), i.e. what the background shows.
        bias = bias_field(rng_signal, geometry.shape, scanner.bias_amplitude)
        gain = scanner.wm_b0_stored / params.s0[1]
        sigma = scanner.wm_b0_stored / scanner.snr_wm_b0
        transfer = kspace_transfer(
            (geometry.shape[1], geometry.shape[2]), scanner.acquired_matrix,
            fermi_radius=scanner.fermi_radius,
        )
        b0_clean, dwi_clean = _ghosts(plan, s0 * bias * np.float32(gain),
                                      sb * bias * np.float32(gain))
        b0_signal = rician_acquired(rng_noise, b0_clean, sigma, transfer)
        dwi_signal = rician_acquired(rng_noise, dwi_clean, sigma, transfer)
    # The scanner computes the ADC with the nominal b-value it writes to the headers.
    adc = scanner_adc(b0_signal, dwi_signal, B_VALUE, background_threshold=5.0 * sigma)

    b0_stored = np.clip(np.rint(b0_signal), 0, DWI_MAX_STORED).astype(np.uint16)
    dwi_stored = np.clip(np.rint(dwi_signal), 0, DWI_MAX_STORED).astype(np.uint16)
    adc_stored = np.rint(adc / ADC_UNIT).astype(np.uint16)

    study = PhantomStudy(
        seed=int(seed),
        lesion_class=cls,
        lesions=tuple(specs),
        geometry=geometry,
        pose=pose,
        acquisition=(
            _acquisition(rng_meta, manufacturer)
            if scanner_domain is None or scanner is None  # (both or neither)
            else _domain_acquisition(rng_meta, scanner_domain, scanner)
        ),
        identity=_identity(
            rng_meta, int(seed), patient_name,
            uid_salt="" if scanner_domain is None else f"domain-{scanner_domain.name}-",
        ),
        tissue_parameters=params,
        noise_sigma=sigma,
        b0=b0_stored,
        dwi=dwi_stored,
        adc=adc_stored,
        fractions=fractions,
        mask=fractions >= 0.5,
        tissue_fractions=tissue_fractions,
        domain=None if scanner_domain is None else scanner_domain.name,
        scanner=scanner,
        mimics=plan.present,
        mimic_parameters={n: plan.parameters.get(n, {}) for n in plan.present},
    )
    logger.debug(
        "phantom seed=%d class=%s grid=%s lesion %.2f mL domain %s",
        seed, cls.value, geometry.shape, study.lesion_volume_ml, study.domain,
    )
    return study
