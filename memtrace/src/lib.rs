pub mod procmaps;
pub mod symbolize;
