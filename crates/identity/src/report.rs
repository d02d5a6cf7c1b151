//! Errors as an operator reads them: one line, each cause said once, and a certificate our own
//! verifier refused said in our words (`SvidError`) rather than in rustls' debug form. The three
//! binaries print fatal errors with `error_chain`; the certificate-service client words its
//! connect failures with it.

use std::error::Error;

use crate::svid::SvidError;

/// `error` and its causes on one line. A cause whose text is already in the line (an error that
/// prints its source itself) is not repeated.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    // rustls prints a certificate error of ours in its debug form, and the layers above it
    // repeat that text in their own messages: put our words in its place everywhere.
    let refused = chain(error)
        .find_map(refused_certificate)
        .map(|(tls, svid)| (tls.to_string(), format!("invalid peer certificate: {svid}")));
    let mut line = String::new();
    for e in chain(error) {
        let mut text = e.to_string();
        if let Some((raw, ours)) = &refused {
            text = text.replace(raw.as_str(), ours);
        }
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// The `SvidError` our verifier refused a peer certificate with, anywhere in `error`'s chain.
pub fn svid_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a SvidError> {
    chain(error).find_map(|e| refused_certificate(e).map(|(_, svid)| svid))
}

/// `error`, then each of its sources.
fn chain<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// The rustls certificate error carrying one of our `SvidError`s, when `e` is one (directly, or
/// inside the `io::Error` a TLS stream returns), and that `SvidError`.
fn refused_certificate<'a>(
    e: &'a (dyn Error + 'static),
) -> Option<(&'a rustls::Error, &'a SvidError)> {
    let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })?;
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<SvidError>().map(|svid| (tls, svid))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::sync::Arc;

    use super::*;
    use crate::SpiffeId;

    #[derive(Debug)]
    struct Outer {
        text: &'static str,
        inner: std::io::Error,
    }

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.inner)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let in_use = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "in use (os error 98)");
        let prints_its_source = Outer {
            text: "cannot listen on 127.0.0.1:1: in use (os error 98)",
            inner: in_use(),
        };
        assert_eq!(
            error_chain(&prints_its_source),
            "cannot listen on 127.0.0.1:1: in use (os error 98)"
        );
        let leaves_it_to_the_chain = Outer {
            text: "cannot listen on 127.0.0.1:1",
            inner: in_use(),
        };
        assert_eq!(
            error_chain(&leaves_it_to_the_chain),
            "cannot listen on 127.0.0.1:1: in use (os error 98)"
        );
    }

    #[test]
    fn a_refused_certificate_is_said_in_our_words() {
        let refused = SvidError::Chain {
            id: SpiffeId::parse("spiffe://cluster.local/ns/latch-system/sa/latch-control").unwrap(),
            reason: "UnknownIssuer".into(),
        };
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(refused.clone())),
        ));
        let raw = tls.to_string();
        assert!(raw.contains("OtherError"), "rustls' own form: {raw}");
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let outer = Outer {
            text: "transport error",
            inner: io,
        };
        let line = error_chain(&outer);
        assert_eq!(
            line,
            format!("transport error: invalid peer certificate: {refused}")
        );
        assert!(!line.contains("OtherError"), "{line}");
        assert!(matches!(svid_error(&outer), Some(SvidError::Chain { .. })));
    }
}
