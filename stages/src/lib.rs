//! The built-in stages, sources and sinks of latentflow.
//!
//! [`builtin`] returns a registry holding all of them; programs add their own kinds to it.

pub mod channels;
pub mod graph;
pub mod image;
pub mod invert;
pub mod io;
pub mod npy;
pub mod onnx;
pub mod plot;
pub mod region;
pub mod report;
pub mod transform;

use latentflow_engine::Registry;

/// A registry with every built-in kind.
pub fn builtin() -> Registry {
    let mut r = Registry::new();
    r.add_source(io::NpySource)
        .add_source(io::SyntheticSource)
        .add_source(io::JsonlSource)
        .add_source(image::ImageFolder)
        .add_source(graph::GraphLoadSource)
        .add_stage(graph::ClassifyStage)
        .add_stage(graph::embed::GnnEmbedStage)
        .add_stage(graph::GcbrStage)
        .add_stage(graph::ReliefStage)
        .add_source(channels::LatentsSource)
        .add_stage(onnx::OnnxStage)
        .add_stage(channels::ChannelAwarenessStage)
        .add_stage(invert::InvertStage)
        .add_stage(invert::GenerateStage)
        .add_stage(invert::OptimizeStage)
        .add_stage(invert::ImageMetricsStage)
        .add_stage(region::RegionDirectionsStage)
        .add_stage(region::EditStage)
        .add_stage(region::ResampleStage)
        .add_stage(transform::ScaleStage)
        .add_stage(transform::CheckFiniteStage)
        .add_stage(transform::ArgmaxStage)
        .add_sink(io::JsonlSink)
        .add_sink(io::NpySink)
        .add_sink(io::ClassificationReport)
        .add_sink(image::PngSink)
        .add_sink(image::GridSink)
        .add_sink(report::SummarySink)
        .add_sink(channels::ChannelReportSink)
        .add_sink(report::CurveSink);
    r
}
