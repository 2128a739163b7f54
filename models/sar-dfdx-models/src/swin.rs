//! UPerNet on a Swin Transformer on dfdx, under `sar-models`' candle names (`backbone.*`,
//! `decode_head.*`, `auxiliary_head.*`).
//! (Being written: see `sar-models`' `seg::swin` and `seg::uper` for the structure.)

use crate::seg::{DropPath, SegOut, SwinVariant};
use crate::Forward;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::Rows;
use sar_dfdx::{Float, Result, SarDevice, SarDfdxError};

/// UPerNet's decode-head width D at width 64 (scaled by width/64).
pub const UPER_CHANNELS: usize = 512;
/// The auxiliary FCN head's width at width 64 (scaled by width/64).
pub const UPER_AUX_CHANNELS: usize = 256;

/// UPerNet on Swin `variant` with window M = `window` at `width` (E scaled by width/64), with
/// the auxiliary head when `aux`, over NHWC rows of `(n, h, w)` images: the decode head's
/// features F `[N·h₄·w₄, D]` at the stage-0 grid (stride 4, [`SegOut::hw`]) and, in training
/// mode with `aux`, the auxiliary head's features on stage 2's grid (stride 16,
/// [`SegOut::aux_hw`]).
pub fn upernet<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    size: (usize, usize, usize),
    (variant, window, width, aux): (SwinVariant, usize, usize, bool),
    drop: Option<DropPath<'_>>,
) -> Result<SegOut<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let _ = (f, x, size, variant, window, width, aux, drop);
    Err(SarDfdxError::Shape(
        "UPerNet on dfdx is not written yet".into(),
    ))
}
