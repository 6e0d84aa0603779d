// smtpproxy web: small progressive enhancements; every page works without it.
"use strict";
