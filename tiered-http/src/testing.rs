//! Helpers shared by the unit tests.

use http::Request;

/// A GET request for `uri` with `headers`.
pub(crate) fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::get(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}
