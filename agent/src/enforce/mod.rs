pub mod fanotify;
