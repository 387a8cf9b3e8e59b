//! The node side of the coordination server: from control's netmaps to the
//! engine ([`convert`]).
pub mod convert;
