//! The cache key of a request: its method, path, query parameters sorted by name, and the
//! values of the configured `Vary` headers.

use http::Request;
use http::header::HeaderName;

/// The cache key: method, path, query parameters sorted by name (then value), and the values of
/// the `vary` headers (absent and empty are distinct).
pub(crate) fn cache_key<B>(request: &Request<B>, vary: &[HeaderName]) -> String {
    let uri = request.uri();
    let mut params: Vec<&str> = uri
        .query()
        .map(|q| q.split('&').filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    params.sort_by(|a, b| split_param(a).cmp(&split_param(b)));
    let mut key = String::with_capacity(16 + uri.path().len() + uri.query().map_or(0, str::len));
    key.push_str(request.method().as_str());
    key.push(' ');
    key.push_str(uri.path());
    for (i, param) in params.iter().enumerate() {
        key.push(if i == 0 { '?' } else { '&' });
        key.push_str(param);
    }
    for name in vary {
        key.push('\n');
        key.push_str(name.as_str());
        let mut values = request.headers().get_all(name).iter().peekable();
        if values.peek().is_none() {
            key.push('!');
        }
        for (i, value) in values.enumerate() {
            key.push(if i == 0 { ':' } else { ',' });
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

fn split_param(param: &str) -> (&str, &str) {
    param.split_once('=').unwrap_or((param, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::get;
    use http::Method;

    #[test]
    fn keys_sort_query_parameters_and_include_vary_headers() {
        let vary = [HeaderName::from_static("accept-language")];
        let key = |request: &Request<()>| cache_key(request, &vary);
        let a = key(&get("/p?b=2&a=1&a=0", &[("accept-language", "en")]));
        let b = key(&get("/p?a=0&a=1&b=2", &[("accept-language", "en")]));
        assert_eq!(a, b);
        assert_ne!(a, key(&get("/p?a=0&a=1&b=2", &[("accept-language", "fr")])));
        assert_ne!(a, key(&get("/p?a=0&a=1&b=2", &[])));
        assert_ne!(
            key(&get("/p", &[("accept-language", "")])),
            key(&get("/p", &[]))
        );
        assert_ne!(key(&get("/p?a=1", &[])), key(&get("/p?a=2", &[])));
        let mut head = get("/p", &[]);
        *head.method_mut() = Method::HEAD;
        assert_ne!(key(&head), key(&get("/p", &[])));
    }
}
