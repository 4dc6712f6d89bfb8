//! The declarations: [`config!`](crate::config) for a table of keys,
//! [`words!`](crate::words) for a key that holds one of a few words.

/// Declares a table of configuration keys, each once: its doc line (which is
/// also its comment in the rendered file), name, type, optional codec and
/// default. From that come the struct (every field `pub`), its [`Default`]
/// (or, with `required` keys, a `from_required` constructor), and an
/// implementation of [`Section`](crate::Section): reading with every problem
/// reported, unknown-key hints, and rendering.
///
/// ```
/// use std::time::Duration;
/// use muster_config::{AtLeast, Checks};
///
/// muster_config::config! {
///     /// Retries.
///     #[derive(Debug, Clone, PartialEq)]
///     pub struct Retry {
///         /// Attempts before giving up.
///         attempts: u32 as AtLeast<1> = 3,
///         /// Delay before the first retry.
///         delay: Duration = Duration::from_secs(5),
///         /// Longest delay.
///         delay_max: Duration = Duration::from_secs(60),
///     }
///     check = check_retry;
/// }
///
/// fn check_retry(r: &Retry, checks: &mut Checks<'_>) {
///     if r.delay > r.delay_max {
///         checks.bad(&["delay", "delay_max"], "is longer than delay_max; it must be at most that");
///     }
/// }
///
/// muster_config::config! {
///     /// The whole file.
///     #[derive(Debug, Clone, PartialEq)]
///     pub struct File {
///         required {
///             /// Who we are.
///             name: String => "set it, e.g. name = \"a\"",
///         }
///         /// Where we keep things.
///         dir: std::path::PathBuf = "/var/lib/x".into(),
///         sections {
///             /// How failures are retried.
///             retry: Retry,
///         }
///     }
/// }
///
/// let f: File = muster_config::parse("name = \"a\"\n[retry]\nattempts = 5\n").unwrap();
/// assert_eq!(f.retry.attempts, 5);
/// assert_eq!(f, File { retry: Retry { attempts: 5, ..Retry::default() }, ..File::from_required("a".into()) });
/// let problems = muster_config::parse::<File>("nme = \"a\"\n[retry]\ndelay = \"2m\"\n").unwrap_err();
/// let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
/// assert_eq!(text, [
///     "1:1: name: is required; set it, e.g. name = \"a\"",
///     "1:1: nme: unknown key; did you mean \"name\"?",
///     "3:1: retry.delay: is longer than delay_max; it must be at most that",
/// ]);
/// ```
///
/// The blocks come in this order, each optional: `required { … }` (keys
/// without a default, written `key: Type [as Codec] => "hint",`), the keys
/// (each ending in a comma),
/// `compound { … }` (fields whose type is a [`Compound`](crate::Compound):
/// several keys of this table that are only valid together), `sections { … }`
/// (sub-tables, each a type declared with this macro). A trailing
/// `check = path;` names a `fn(&Self, &mut Checks)` run on the value read
/// (see [`Checks::bad`](crate::Checks::bad) for how a refused key's stand-in
/// default is kept out of its problems).
#[macro_export]
macro_rules! config {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            required {
                $( $(#[doc = $rdoc:literal])+ $rfield:ident : $rty:ty $(as $rcodec:ty)? => $hint:expr ),+ $(,)?
            }
            $( $(#[doc = $doc:literal])+ $field:ident : $ty:ty $(as $codec:ty)? = $default:expr , )*
            $( compound { $( $(#[doc = $gdoc:literal])+ $gfield:ident : $gty:ty ),* $(,)? } )?
            $( sections { $( $(#[doc = $sdoc:literal])+ $sfield:ident : $sty:ty ),* $(,)? } )?
        }
        $(check = $check:path;)?
    ) => {
        $crate::config! { @section
            meta [$(#[$meta])*] vis [$vis] name [$name]
            required [$( [$($rdoc)+] $rfield [$rty] [$($rcodec)?] [$hint] )+]
            keys [$( [$($doc)+] $field [$ty] [$($codec)?] [$default] )*]
            compound [$($( [$($gdoc)+] $gfield [$gty] )*)?]
            sections [$($( [$($sdoc)+] $sfield [$sty] )*)?]
            check [$($check)?]
        }

        impl $name {
            /// A configuration with the required keys as given and every other key at its default.
            $vis fn from_required($($rfield: $rty),+) -> Self {
                Self {
                    $($rfield,)+
                    $($field: $default,)*
                    $($($gfield: ::core::default::Default::default(),)*)?
                    $($($sfield: ::core::default::Default::default(),)*)?
                }
            }
        }
    };

    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[doc = $doc:literal])+ $field:ident : $ty:ty $(as $codec:ty)? = $default:expr , )*
            $( compound { $( $(#[doc = $gdoc:literal])+ $gfield:ident : $gty:ty ),* $(,)? } )?
            $( sections { $( $(#[doc = $sdoc:literal])+ $sfield:ident : $sty:ty ),* $(,)? } )?
        }
        $(check = $check:path;)?
    ) => {
        $crate::config! { @section
            meta [$(#[$meta])*] vis [$vis] name [$name]
            required []
            keys [$( [$($doc)+] $field [$ty] [$($codec)?] [$default] )*]
            compound [$($( [$($gdoc)+] $gfield [$gty] )*)?]
            sections [$($( [$($sdoc)+] $sfield [$sty] )*)?]
            check [$($check)?]
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                    $($($gfield: ::core::default::Default::default(),)*)?
                    $($($sfield: ::core::default::Default::default(),)*)?
                }
            }
        }
    };

    (@section
        meta [$(#[$meta:meta])*] vis [$vis:vis] name [$name:ident]
        required [$( [$($rdoc:literal)+] $rfield:ident [$rty:ty] [$($rcodec:ty)?] [$hint:expr] )*]
        keys [$( [$($doc:literal)+] $field:ident [$ty:ty] [$($codec:ty)?] [$default:expr] )*]
        compound [$( [$($gdoc:literal)+] $gfield:ident [$gty:ty] )*]
        sections [$( [$($sdoc:literal)+] $sfield:ident [$sty:ty] )*]
        check [$($check:path)?]
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[doc = $rdoc])+ pub $rfield: $rty, )*
            $( $(#[doc = $doc])+ pub $field: $ty, )*
            $( $(#[doc = $gdoc])+ pub $gfield: $gty, )*
            $( $(#[doc = $sdoc])+ pub $sfield: $sty, )*
        }

        impl $crate::Section for $name {
            fn keys() -> ::std::vec::Vec<&'static str> {
                #[allow(unused_mut)]
                let mut keys: ::std::vec::Vec<&'static str> =
                    ::std::vec![$(stringify!($rfield),)* $(stringify!($field),)*];
                $( keys.extend(<<$gty as $crate::Compound>::Keys as $crate::Section>::keys()); )*
                $( keys.push(stringify!($sfield)); )*
                keys
            }

            fn read_from(reader: &mut $crate::Reader<'_>) -> ::core::option::Option<Self> {
                $( let $rfield = reader.required::<$rty, $crate::__codec!($rty $(, $rcodec)?)>(
                    stringify!($rfield), $hint); )*
                $( let $field = reader.key::<$ty, $crate::__codec!($ty $(, $codec)?)>(
                    stringify!($field), || $default); )*
                $( let $gfield = reader.compound::<$gty>(); )*
                $( let $sfield = reader.section::<$sty>(stringify!($sfield)); )*
                // A refused key was reported; its default stands in so the
                // checks can still look at the others.
                let value = Self {
                    $( $rfield: $rfield?, )*
                    $( $field: $field.unwrap_or_else(|| $default), )*
                    $( $gfield: $gfield.unwrap_or_default(), )*
                    $( $sfield: $sfield.unwrap_or_default(), )*
                };
                $( reader.check(&value, $check); )?
                ::core::option::Option::Some(value)
            }

            fn render_into(&self, writer: &mut $crate::Writer) {
                $( writer.key::<$rty, $crate::__codec!($rty $(, $rcodec)?)>(
                    stringify!($rfield), &[$($rdoc),+], &self.$rfield, ::core::option::Option::None); )*
                $( writer.key::<$ty, $crate::__codec!($ty $(, $codec)?)>(
                    stringify!($field), &[$($doc),+], &self.$field, ::core::option::Option::Some(&$default)); )*
                $( writer.compound(&self.$gfield); )*
                $( writer.section(stringify!($sfield), &[$($sdoc),+], &self.$sfield); )*
            }
        }
    };
}

/// The codec of a key: the one named after `as`, else the type itself.
#[doc(hidden)]
#[macro_export]
macro_rules! __codec {
    ($ty:ty) => {
        $ty
    };
    ($ty:ty, $codec:ty) => {
        $codec
    };
}

/// Makes a fieldless enum a [`Codec`](crate::Codec) of itself: each variant
/// is written in the file as its word, and any other word is refused with the
/// list and the nearest word.
///
/// ```
/// #[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// pub enum Mode { Exec, Wake }
/// muster_config::words!(Mode { Mode::Exec => "exec", Mode::Wake => "wake" });
/// ```
#[macro_export]
macro_rules! words {
    ($ty:ty { $($variant:path => $word:literal),+ $(,)? }) => {
        impl $crate::Codec<$ty> for $ty {
            fn read(node: &$crate::Node<'_>) -> ::core::result::Result<$ty, $crate::Refused> {
                $crate::codec::read_word(node, &[$(($word, $variant)),+])
            }

            fn write(value: &$ty) -> ::std::string::String {
                let word = match value {
                    $($variant => $word,)+
                };
                $crate::codec::quote(word)
            }
        }
    };
}
