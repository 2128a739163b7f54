//! The conformance suite against every backend available on this machine.
use candle_core::{DType, Device};
use sar_candle::{CandleBackend, Kernels};
use sar_conformance::{conformance_tests, Tol};
use sar_dfdx::DfdxBackend;
use sar_ndarray::NdarrayBackend;

conformance_tests!(ndarray_f64, Some(NdarrayBackend::<f64>::new()), Tol::F64);
conformance_tests!(ndarray_f32, Some(NdarrayBackend::<f32>::new()), Tol::F32);
conformance_tests!(
    candle_cpu_fused_f64,
    CandleBackend::new(Device::Cpu, DType::F64).ok(),
    Tol::F64
);
conformance_tests!(
    candle_cpu_fused_f32,
    CandleBackend::new(Device::Cpu, DType::F32).ok(),
    Tol::F32
);
conformance_tests!(
    candle_cpu_composite_f64,
    CandleBackend::new(Device::Cpu, DType::F64)
        .ok()
        .map(|b| b.with_kernels(Kernels::Composite)),
    Tol::F64
);
conformance_tests!(
    candle_cpu_composite_f32,
    CandleBackend::new(Device::Cpu, DType::F32)
        .ok()
        .map(|b| b.with_kernels(Kernels::Composite)),
    Tol::F32
);
conformance_tests!(dfdx_cpu_f64, Some(DfdxBackend::<f64>::cpu()), Tol::F64);
conformance_tests!(dfdx_cpu_f32, Some(DfdxBackend::<f32>::cpu()), Tol::F32);

/// candle on the first CUDA device; `None` (skipped) when there is none, unless
/// `SAR_REQUIRE_CUDA` is set (the GPU script sets it, so a missing device fails loudly there).
#[cfg(feature = "cuda")]
fn cuda(dtype: DType) -> Option<CandleBackend> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(CandleBackend::new(dev, dtype).expect("F32/F64")),
        Err(e) if std::env::var_os("SAR_REQUIRE_CUDA").is_some() => panic!("no CUDA device: {e}"),
        Err(_) => None,
    }
}
#[cfg(feature = "cuda")]
conformance_tests!(candle_cuda_f64, cuda(DType::F64), Tol::F64);
#[cfg(feature = "cuda")]
conformance_tests!(candle_cuda_f32, cuda(DType::F32), Tol::F32);

/// dfdx on the first CUDA device, like [`cuda`].
#[cfg(feature = "cuda")]
fn dfdx_cuda<E: sar_dfdx::Float>() -> Option<DfdxBackend<E, sar_dfdx::dfdx::tensor::Cuda>>
where
    sar_dfdx::dfdx::tensor::Cuda: sar_dfdx::SarDevice<E>,
{
    match sar_dfdx::dfdx::tensor::Cuda::try_build(0, 0) {
        Ok(dev) => Some(DfdxBackend::new(dev)),
        Err(e) if std::env::var_os("SAR_REQUIRE_CUDA").is_some() => panic!("no CUDA device: {e:?}"),
        Err(_) => None,
    }
}
#[cfg(feature = "cuda")]
conformance_tests!(dfdx_cuda_f64, dfdx_cuda::<f64>(), Tol::F64);
#[cfg(feature = "cuda")]
conformance_tests!(dfdx_cuda_f32, dfdx_cuda::<f32>(), Tol::F32);
