//! SegFormer on dfdx: the Mix Transformer backbone (MiT-B0 … B5) and SegFormer's all-MLP
//! decode head, under `sar-models`' candle names (`backbone.layers.*`, `decode_head.*`).
//! (Being written: see `sar-models`' `seg::mit` and `seg::segformer` for the structure.)

use crate::seg::DropPath;
use crate::Forward;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::Rows;
use sar_dfdx::{Float, Result, SarDevice, SarDfdxError};

/// SegFormer's decode-head width D for MiT-B`b` at `width` (256 for B0/B1, 768 for B2–B5,
/// times width/64).
pub fn head_channels(b: u8, width: usize) -> usize {
    (if b <= 1 { 256 } else { 768 }) * width / 64
}

/// SegFormer on MiT-B`b` at `width` (E scaled by width/64) over NHWC rows of `(n, h, w)`
/// images: the decode head's features F `[N·h₄·w₄, D]` (before dropout and `conv_seg`) and
/// (h₄, w₄), the stage-0 grid (stride 4).
#[allow(clippy::type_complexity)]
pub fn segformer<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    size: (usize, usize, usize),
    b: u8,
    width: usize,
    drop: Option<DropPath<'_>>,
) -> Result<(Rows<D, T, E>, (usize, usize))>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let _ = (f, x, size, b, width, drop);
    Err(SarDfdxError::Shape(
        "SegFormer on dfdx is not written yet".into(),
    ))
}
