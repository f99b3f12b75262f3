//! End-to-end tests: real daemons over real sockets, real mutual TLS, real stores on disk.

use std::time::Duration;

use tests::*;

mod link;
mod etsi;
mod service;
mod deploy;
mod sim;
