//! Passwords and libpq's files: a password comes from `password_env` or `password_file`, or
//! else from the password file (`~/.pgpass`, `PGPASSFILE`) with libpq's matching rules; the
//! connection service file (`pg_service.conf`) supplies defaults for `service=NAME`.

use super::*;

impl DbConfig {
    /// Reads the password from its environment variable or file. A file loses one trailing
    /// newline (`\n` or `\r\n`); an unset or empty variable, or an unreadable or empty file, is an
    /// error naming it. The password itself never appears in an error.
    pub fn resolve_password(&self) -> Result<Option<String>, ConfigError> {
        self.password.resolve(&self.section)
    }
}

impl PasswordSource {
    /// The secret, read now; errors name `section` and the variable or file, never the value.
    pub fn resolve(&self, section: &str) -> Result<Option<String>, ConfigError> {
        match self {
            PasswordSource::None => Ok(None),
            PasswordSource::Env(var) => {
                let env_error = |problem: &str| ConfigError::PasswordEnv {
                    section: section.to_owned(),
                    var: var.clone(),
                    problem: problem.to_owned(),
                };
                match std::env::var(var) {
                    Ok(value) if value.is_empty() => Err(env_error(
                        "is empty: export the password in it before starting stagingprop",
                    )),
                    Ok(value) => Ok(Some(value)),
                    Err(std::env::VarError::NotPresent) => Err(env_error(
                        "is not set: export the password in it before starting stagingprop, or use password_file",
                    )),
                    Err(std::env::VarError::NotUnicode(_)) => {
                        Err(env_error("is not valid UTF-8: fix its value"))
                    }
                }
            }
            PasswordSource::File(path) => {
                let file_error = |problem: String| ConfigError::PasswordFile {
                    section: section.to_owned(),
                    path: path.clone(),
                    problem,
                };
                let bytes = std::fs::read(path).map_err(|err| {
                    file_error(format!(
                        "cannot read it ({err}): check the path and that stagingprop may read it"
                    ))
                })?;
                let mut text = String::from_utf8(bytes)
                    .map_err(|_| file_error("is not valid UTF-8: fix its contents".into()))?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                if text.is_empty() {
                    return Err(file_error("is empty: write the password into it".into()));
                }
                Ok(Some(text))
            }
        }
    }
}
