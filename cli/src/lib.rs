//! vdisk command-line front end.
