//! The client-visible contract against `roomcast standalone` (one process, in-memory store and
//! broker).

#[macro_use]
mod common;

client_visible_tests!(roomcast_integration::Flavor::Standalone);
