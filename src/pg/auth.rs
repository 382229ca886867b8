//! The client's side of PostgreSQL authentication as plain steps over bytes: given the server's
//! request, what to answer (cleartext, md5, SCRAM-SHA-256 without channel binding), with no
//! socket. The replication connection feeds it each Authentication message and sends what it
//! wrote.

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;

use super::backend::{self, AuthRequest};

/// Why the client cannot answer the server's authentication request.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the server asks for a password and none is configured")]
    PasswordMissing,
    #[error("the server asks for authentication method {0}, which stagingprop does not support")]
    Unsupported(String),
    #[error("SCRAM-SHA-256: {0}")]
    Scram(std::io::Error),
    #[error("{0}")]
    Protocol(String),
}

/// What the connection does after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// An answer was written: send it and read the server's next message.
    Answer,
    /// Nothing to send; read the server's next message (SASL final, checked).
    Wait,
    /// The server accepted the client.
    Done,
}

/// One authentication exchange: the user, the password if configured, and the SCRAM state
/// between its messages.
pub struct Authenticator {
    user: String,
    password: Option<Vec<u8>>,
    scram: Option<ScramSha256>,
}

impl Authenticator {
    pub fn new(user: &str, password: Option<&[u8]>) -> Authenticator {
        Authenticator {
            user: user.to_owned(),
            password: password.map(<[u8]>::to_vec),
            scram: None,
        }
    }

    fn password(&self) -> Result<&[u8], AuthError> {
        self.password.as_deref().ok_or(AuthError::PasswordMissing)
    }

    /// Answers `request` into `out` (frontend messages, ready to send).
    pub fn step(
        &mut self,
        request: AuthRequest,
        out: &mut BytesMut,
    ) -> Result<AuthStep, AuthError> {
        let protocol = |e: std::io::Error| AuthError::Protocol(e.to_string());
        match request {
            AuthRequest::Ok => return Ok(AuthStep::Done),
            AuthRequest::Cleartext => {
                frontend::password_message(self.password()?, out).map_err(protocol)?;
            }
            AuthRequest::Md5 { salt } => {
                let hashed = md5_hash(self.user.as_bytes(), self.password()?, salt);
                frontend::password_message(hashed.as_bytes(), out).map_err(protocol)?;
            }
            AuthRequest::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(AuthError::Unsupported(format!(
                        "SASL ({})",
                        mechanisms.join(", ")
                    )));
                }
                // Channel binding is not offered ('n'), which every server accepts.
                let state = ScramSha256::new(self.password()?, ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), out)
                    .map_err(protocol)?;
                self.scram = Some(state);
            }
            AuthRequest::SaslContinue(body) => {
                let state = self.scram.as_mut().ok_or_else(|| {
                    AuthError::Protocol("SASL continue without SASL start".into())
                })?;
                state.update(&body).map_err(AuthError::Scram)?;
                frontend::sasl_response(state.message(), out).map_err(protocol)?;
            }
            AuthRequest::SaslFinal(body) => {
                let state = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| AuthError::Protocol("SASL final without SASL start".into()))?;
                state.finish(&body).map_err(AuthError::Scram)?;
                return Ok(AuthStep::Wait);
            }
            AuthRequest::Other(code) => {
                return Err(AuthError::Unsupported(
                    backend::auth_method_name(code).to_owned(),
                ));
            }
        }
        Ok(AuthStep::Answer)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// The frontend messages in `out`: (tag, body) each.
    fn messages(out: &BytesMut) -> Vec<(u8, Vec<u8>)> {
        let mut rest = &out[..];
        let mut found = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            found.push((rest[0], rest[5..1 + len].to_vec()));
            rest = &rest[1 + len..];
        }
        found
    }

    #[test]
    fn cleartext_and_md5_answer_with_the_password_and_its_hash() {
        let mut auth = Authenticator::new("shop", Some(b"secret"));
        let mut out = BytesMut::new();
        assert_eq!(
            auth.step(AuthRequest::Cleartext, &mut out).unwrap(),
            AuthStep::Answer
        );
        assert_eq!(messages(&out), vec![(b'p', b"secret\0".to_vec())]);

        out.clear();
        let salt = [1, 2, 3, 4];
        auth.step(AuthRequest::Md5 { salt }, &mut out).unwrap();
        let expected = md5_hash(b"shop", b"secret", salt);
        assert!(expected.starts_with("md5") && expected.len() == 35);
        let mut body = expected.into_bytes();
        body.push(0);
        assert_eq!(messages(&out), vec![(b'p', body)]);
    }

    #[test]
    fn a_password_request_without_a_password_is_refused_before_anything_is_sent() {
        let mut auth = Authenticator::new("shop", None);
        let mut out = BytesMut::new();
        for request in [
            AuthRequest::Cleartext,
            AuthRequest::Md5 { salt: [0; 4] },
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM_SHA_256.to_owned()],
            },
        ] {
            assert!(matches!(
                auth.step(request, &mut out),
                Err(AuthError::PasswordMissing)
            ));
        }
        assert!(out.is_empty());
    }

    #[test]
    fn scram_starts_with_the_mechanism_and_a_client_nonce() {
        let mut auth = Authenticator::new("shop", Some(b"secret"));
        let mut out = BytesMut::new();
        let request = AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), SCRAM_SHA_256.into()],
        };
        assert_eq!(auth.step(request, &mut out).unwrap(), AuthStep::Answer);
        let sent = messages(&out);
        assert_eq!(sent.len(), 1);
        let (tag, body) = &sent[0];
        assert_eq!(*tag, b'p');
        let mechanism_end = body.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&body[..mechanism_end], SCRAM_SHA_256.as_bytes());
        // Then the length of the client-first message and the message itself: no channel
        // binding ("n,,"), any user name (the startup message's counts), a nonce.
        let first = String::from_utf8(body[mechanism_end + 5..].to_vec()).unwrap();
        assert!(first.starts_with("n,,n=,r="), "{first}");
    }

    #[test]
    fn a_server_nonce_that_does_not_extend_the_clients_is_a_scram_error() {
        let mut auth = Authenticator::new("shop", Some(b"secret"));
        let mut out = BytesMut::new();
        auth.step(
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM_SHA_256.into()],
            },
            &mut out,
        )
        .unwrap();
        let forged = Bytes::from_static(b"r=not-the-clients-nonce,s=QSXCR+Q6sek8bf92,i=4096");
        assert!(matches!(
            auth.step(AuthRequest::SaslContinue(forged), &mut out),
            Err(AuthError::Scram(_))
        ));
    }

    #[test]
    fn sasl_steps_out_of_order_and_other_methods_are_refused() {
        let mut auth = Authenticator::new("shop", Some(b"secret"));
        let mut out = BytesMut::new();
        assert!(matches!(
            auth.step(AuthRequest::SaslContinue(Bytes::new()), &mut out),
            Err(AuthError::Protocol(_))
        ));
        assert!(matches!(
            auth.step(AuthRequest::SaslFinal(Bytes::new()), &mut out),
            Err(AuthError::Protocol(_))
        ));
        assert!(matches!(
            auth.step(
                AuthRequest::Sasl {
                    mechanisms: vec!["OAUTHBEARER".into()]
                },
                &mut out
            ),
            Err(AuthError::Unsupported(m)) if m.contains("OAUTHBEARER")
        ));
        // GSSAPI (7) is named, not numbered.
        assert!(matches!(
            auth.step(AuthRequest::Other(7), &mut out),
            Err(AuthError::Unsupported(m)) if !m.is_empty() && !m.contains('7')
        ));
        assert_eq!(
            auth.step(AuthRequest::Ok, &mut out).unwrap(),
            AuthStep::Done
        );
    }
}
