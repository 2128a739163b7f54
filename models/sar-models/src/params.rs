//! Reproducible parameter creation: every tensor is drawn from a portable generator
//! ([`sar_math::anchors::AnchorRng`]) seeded by the model seed, in construction order, so the
//! same seed gives the same bits on every machine and backend.
//!
//! Initialisers follow PyTorch's: Kaiming normal (`std = √(2/fan)`, fan_in or fan_out),
//! the default `nn.Linear` rule (uniform in ±1/√fan_in for weight and bias), constants for
//! BatchNorm (weight 1, bias 0, running mean 0, running variance 1).

use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sar_math::anchors::AnchorRng;

/// How to fill a new tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Uniform in ±bound.
    Uniform(f64),
    /// Every element this value.
    Const(f64),
}

/// Creates parameters in a [`VarMap`] under dotted names.
pub struct ParamInit<'a> {
    varmap: &'a VarMap,
    device: Device,
    dtype: DType,
    rng: AnchorRng,
}

impl<'a> ParamInit<'a> {
    /// A creator drawing from `seed`.
    pub fn new(varmap: &'a VarMap, device: Device, dtype: DType, seed: u64) -> Self {
        ParamInit {
            varmap,
            device,
            dtype,
            rng: AnchorRng::new(seed ^ 0x4D4F_4445_4C5F_494E),
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tensor `name` of `shape`: the one already in the map (a loaded checkpoint wins), else
    /// a new variable filled by `init`. Values are drawn either way, so later tensors do not
    /// depend on what was loaded.
    pub fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = match init {
            Init::Normal(std) => (0..n).map(|_| std * self.rng.next_normal()).collect(),
            Init::Uniform(b) => (0..n)
                .map(|_| b * (2.0 * self.rng.next_f64() - 1.0))
                .collect(),
            Init::Const(v) => vec![v; n],
        };
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.dims() != shape {
                return Err(crate::ModelError::Config(format!(
                    "parameter {name} has shape {:?}, the model needs {shape:?}",
                    v.dims()
                )));
            }
            return Ok(v.as_tensor().clone());
        }
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }
}

/// Names in a [`VarMap`] that are BatchNorm running statistics (state, not parameters):
/// `sar-math`'s one definition.
pub use sar_math::batch_norm::is_running_stat;
