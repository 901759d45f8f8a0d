"""Distillation of a denoiser teacher into an energy student (DESIGN.md section 4; docs/conventions.md), by role:

    loss         the Helmholtz projection loss and its E-DSM switch (`DenoiserMatchingLoss`)
    conditions   off-condition rows: re-label rows (null token, another class) where compositions read the student
    level_loss   the projection loss plus the level term pinning energy levels across sigma (`LevelMatchingLoss`)
    diagnostics  residual, teacher asymmetry (Hutchinson), a denoiser's relative Jacobian asymmetry per sigma,
                 excess denoiser / relative-energy errors per sigma bucket
    level_diagnostics  energy levels per sigma bucket: mode offsets, time-score error, residual excess (`level_report`)
    module       the LightningModule (`DistillationModule`)
    callbacks    validation plots (`SamplePlots`)
    plotting     densities, ODE samples, image grids

Determinism (EDM style: sample i depends on the seed only, not on the process count): the global batch of step k is a
pure function of (seed, k) (`fkdiff.data.StepBatches`), and so are its sigma and eps, drawn for the whole global batch
and sliced per rank (`fkdiff.training.StepModule`). `ckpt_path=last` therefore resumes the exact trajectory, and N DDP
processes reproduce one process.
"""

from fkdiff.data.order import StepBatches
from fkdiff.distillation.callbacks import SamplePlots
from fkdiff.distillation.conditions import OffConditionRows
from fkdiff.distillation.diagnostics import (bucket_names, bucketize, denoiser_asymmetry_by_sigma,
                                             denoiser_error_by_bucket, energy_gap_error_by_bucket, jacobian_asymmetry,
                                             per_bucket_mean, teacher_asymmetry)
from fkdiff.distillation.level_diagnostics import (integrated_level_error_by_bucket, level_report,
                                                   mode_offset_error_by_bucket, residual_by_bucket, teacher_regions,
                                                   time_score_error_by_bucket)
from fkdiff.distillation.level_loss import LevelMatchingLoss, LevelMatchingOutput
from fkdiff.distillation.loss import DenoiserMatchingLoss, LossOutput, denoise, split_batch
from fkdiff.distillation.module import DistillationModule
from fkdiff.distillation.plotting import energy_grid, euler_sample, image_grid_figure, plot_densities, sample_figure
from fkdiff.seeding import derive_seed as step_seed
from fkdiff.training.callbacks import FinalCheckpoint

__all__ = ["step_seed", "DenoiserMatchingLoss", "LossOutput", "teacher_asymmetry", "jacobian_asymmetry",
           "denoiser_asymmetry_by_sigma", "denoiser_error_by_bucket",
           "energy_gap_error_by_bucket", "bucketize", "bucket_names", "per_bucket_mean", "StepBatches",
           "DistillationModule", "FinalCheckpoint", "SamplePlots", "euler_sample", "energy_grid", "image_grid_figure",
           "sample_figure", "plot_densities", "denoise", "split_batch", "LevelMatchingLoss", "LevelMatchingOutput",
           "level_report", "teacher_regions", "mode_offset_error_by_bucket", "time_score_error_by_bucket",
           "integrated_level_error_by_bucket", "residual_by_bucket", "OffConditionRows"]
