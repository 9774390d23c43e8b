//! The client-visible contract against `gateway standalone` (one process, in-memory store and
//! broker).

#[macro_use]
mod common;

client_visible_tests!(roomcast_integration::Flavor::Standalone);
