//! The node side of the coordination server: the `[control]` settings and
//! the node key ([`settings`]), from control's netmaps to the engine
//! ([`convert`]), the sealed HTTP requests ([`http`]) and the task that
//! keeps the map stream open and applies it ([`task`]).
pub mod convert;
pub mod http;
pub mod settings;
pub mod task;
