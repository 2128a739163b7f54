//! Reproducible parameter creation: every tensor is drawn from a portable generator
//! ([`sar_math::rng::SeededRng`]) seeded by the model seed, in construction order, so the
//! same seed gives the same bits on every machine and backend. Names are dotted paths built
//! by [`Scope::pp`].
//!
//! Initialisers follow PyTorch's: Kaiming normal (`std = √(2/fan)`, fan_in or fan_out),
//! the default `nn.Linear` rule (uniform in ±1/√fan_in for weight and bias), constants for
//! BatchNorm (weight 1, bias 0, running mean 0, running variance 1).

use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sar_math::rng::SeededRng;
use std::cell::RefCell;
use std::rc::Rc;

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

/// What all scopes of one model share: the map, where and in what dtype tensors live, and the
/// generator (one stream per model, drawn in construction order).
struct Shared<'a> {
    varmap: &'a VarMap,
    device: Device,
    dtype: DType,
    rng: RefCell<SeededRng>,
    scheme: InitScheme,
}

/// How a network's convolution and linear weights are initialised (`model.init`).
///
/// | scheme | conv weight `[out, in, k, k]` | linear weight `[out, in]` | linear bias |
/// |---|---|---|---|
/// | `reference` (default) | the architecture's own: Kaiming normal fan_out for the small CNN and torchvision's ResNets, fan_in for the CIFAR ResNet-32 | `nn.Linear`'s default (Kaiming normal fan_in for ResNet-32) | U(±1/√in) |
/// | `torch-default` | PyTorch's `nn.Conv2d` default, `kaiming_uniform_(a = √5)`: U(±1/√(in·k²)) | U(±1/√in) | U(±1/√in) |
/// | `kaiming-fan-out` | N(0, 2/(out·k²)) | U(±1/√in) | U(±1/√in) |
/// | `kaiming-fan-in` | N(0, 2/(in·k²)) | N(0, 2/in) | U(±1/√in) |
///
/// BatchNorm always starts at weight 1, bias 0, running mean 0 and running variance 1. The
/// values come from the model's seeded generator in construction order, so one seed gives one
/// set of weights on every backend (dfdx copies candle's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitScheme {
    /// Each architecture's own initialisation.
    #[default]
    Reference,
    /// PyTorch's defaults for `nn.Conv2d` and `nn.Linear`.
    TorchDefault,
    /// Kaiming normal with fan_out for every convolution.
    KaimingFanOut,
    /// Kaiming normal with fan_in for every convolution and linear weight.
    KaimingFanIn,
}

/// A path in a model's [`VarMap`], as candle's `VarBuilder::pp` makes them: `init.pp("layer1")
/// .pp(0).pp("conv1")` names its tensors `layer1.0.conv1.{name}`. Cloning or scoping shares
/// the map and the generator.
#[derive(Clone)]
pub struct Scope<'a> {
    shared: Rc<Shared<'a>>,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The root scope (no prefix) of a model drawing from `seed`, each layer initialised its
    /// architecture's way.
    pub fn new(varmap: &'a VarMap, device: Device, dtype: DType, seed: u64) -> Self {
        Self::with_scheme(varmap, device, dtype, seed, InitScheme::Reference)
    }

    /// [`Scope::new`] with every convolution and linear layer initialised by `scheme`.
    pub fn with_scheme(
        varmap: &'a VarMap,
        device: Device,
        dtype: DType,
        seed: u64,
        scheme: InitScheme,
    ) -> Self {
        Scope {
            shared: Rc::new(Shared {
                varmap,
                device,
                dtype,
                rng: RefCell::new(SeededRng::new(seed ^ 0x4D4F_4445_4C5F_494E)),
                scheme,
            }),
            prefix: String::new(),
        }
    }

    /// The initialisation scheme of the model.
    pub fn scheme(&self) -> InitScheme {
        self.shared.scheme
    }

    /// The sub-scope `{prefix}.{name}` (`name` alone at the root); `name` may be an index.
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        Scope {
            shared: self.shared.clone(),
            prefix: self.path(name),
        }
    }

    /// The full dotted name of `name` in this scope.
    pub fn path(&self, name: impl std::fmt::Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The tensor `name` of `shape` in this scope: the one already in the map (a loaded
    /// checkpoint wins; of another shape it is an error naming the full name and both shapes),
    /// else a new variable filled by `init`. Values are drawn either way, so later tensors do
    /// not depend on what was loaded.
    pub fn get_or_insert(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f64> = {
            let mut rng = self.shared.rng.borrow_mut();
            match init {
                Init::Normal(std) => (0..n).map(|_| std * rng.next_normal()).collect(),
                Init::Uniform(b) => (0..n).map(|_| b * (2.0 * rng.next_f64() - 1.0)).collect(),
                Init::Const(v) => vec![v; n],
            }
        };
        let name = self.path(name);
        let mut data = self.shared.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(&name) {
            if v.dims() != shape {
                return Err(crate::ModelError::Config(format!(
                    "parameter {name} has shape {:?}, the model needs {shape:?}",
                    v.dims()
                )));
            }
            return Ok(v.as_tensor().clone());
        }
        let t =
            Tensor::from_vec(values, shape, &self.shared.device)?.to_dtype(self.shared.dtype)?;
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        data.insert(name, var);
        Ok(t)
    }
}

/// Names in a [`VarMap`] that are BatchNorm running statistics (state, not parameters):
/// `sar-math`'s one definition.
pub use sar_math::batch_norm::is_running_stat;

#[cfg(test)]
mod tests {
    use super::{Init, Scope};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn scopes_join_dotted_paths_and_an_existing_tensor_of_another_shape_is_an_error() {
        let varmap = VarMap::new();
        let root = Scope::new(&varmap, Device::Cpu, DType::F32, 3);
        let conv = root.pp("layer1").pp(0).pp("conv1");
        assert_eq!(conv.path("weight"), "layer1.0.conv1.weight");
        assert_eq!(root.path("fc"), "fc");
        let w = conv
            .get_or_insert("weight", &[2, 3], Init::Const(1.0))
            .unwrap();
        assert_eq!(w.dims(), &[2, 3]);
        // The same name and shape: the registered tensor.
        let again = conv
            .get_or_insert("weight", &[2, 3], Init::Const(0.0))
            .unwrap();
        assert_eq!(again.to_vec2::<f32>().unwrap(), vec![vec![1.0; 3]; 2]);
        let err = conv
            .get_or_insert("weight", &[3, 2], Init::Const(0.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer1.0.conv1.weight")
                && err.contains("[2, 3]")
                && err.contains("[3, 2]"),
            "{err}"
        );
    }
}
