//! End-to-end tests: real daemons over real sockets, real mutual TLS, real stores on disk.

use std::time::Duration;

use tests::*;

mod auth;
mod custody;
mod deploy;
mod device;
mod etsi;
mod lab;
mod link;
mod ops;
mod pki;
mod reagree;
mod service;
mod sim;
mod store;
