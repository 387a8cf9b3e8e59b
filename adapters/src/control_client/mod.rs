//! The node side of the coordination server: the `[control]` settings and
//! the node key ([`settings`]), from control's netmaps to the engine
//! ([`convert`]).
pub mod convert;
pub mod settings;
